"""Tiny tokenizer vocabularies as GGUF metadata dicts (keys exactly as in a GGUF file).

`tiny_spm_metadata()` is laid out like Gemma 3's SentencePiece vocabulary and `tiny_bpe_metadata()` like
Qwen2.5's byte-level BPE vocabulary: special, control, user-defined and byte tokens, bos/eos and a chat
template, in a few hundred tokens. Both are deterministic and need nothing but this file, so tests can
write tiny models with them that llama.cpp loads too.
"""

from __future__ import annotations

# GGUF token types (llama.cpp's llama_token_type).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

SPM_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else message['role']) + '\n' }}"
    "{{ message['content'] | trim }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)

BPE_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# SentencePiece pieces and scores: a higher score merges first. Chosen so that tests can tell the
# merge order apart from greedy left-to-right matching:
#   'xyz' -> x + yz (yz scores higher than xy); 'que' -> qu + e (equal scores: the leftmost pair wins);
#   'a> </b' -> a + '>▁</' + b, a token that spans a word boundary.
_SPM_PIECES = [
    ("\u2581", -1.0),
    *[(c, -2.0 - 0.01 * i) for i, c in enumerate("etaoinshrdlcumwfgypbvkjxqz")],
    *[(c, -2.5) for c in ".,!?'<>/"],
    ("\u2581t", -3.0), ("he", -3.1), ("\u2581the", -3.2), ("\u2581a", -3.3), ("in", -3.4),
    ("\u2581w", -3.5), ("or", -3.6), ("ld", -3.7), ("\u2581wor", -3.8), ("\u2581world", -3.9),
    ("\u2581h", -4.0), ("el", -4.1), ("ll", -4.2), ("lo", -4.3), ("\u2581he", -4.4), ("\u2581hel", -4.5),
    ("\u2581hello", -4.6), ("at", -4.7), ("\u2581c", -4.8), ("\u2581cat", -4.9), ("\u2581s", -5.0),
    ("\u2581sat", -5.1), ("xy", -6.0), ("yz", -5.5), ("qu", -6.5), ("ue", -6.5),
    ("</", -2.6), (">\u2581", -2.7), (">\u2581</", -2.8),
]


def tiny_spm_metadata() -> dict:
    """A Gemma-3-like SentencePiece vocabulary ('llama' model) of 330 tokens."""
    tokens: list[str] = []
    scores: list[float] = []
    types: list[int] = []

    def add(text: str, score: float, token_type: int) -> None:
        tokens.append(text)
        scores.append(score)
        types.append(token_type)

    for text in ("<pad>", "<eos>", "<bos>"):
        add(text, -1000.0, CONTROL)
    add("<unk>", -1000.0, UNKNOWN)
    add("<start_of_turn>", -1000.0, CONTROL)
    add("<end_of_turn>", -1000.0, CONTROL)
    for text in ("\n", "\n\n", "  ", "<b>"):
        add(text, -1000.0, USER_DEFINED)
    for byte in range(256):
        add(f"<0x{byte:02X}>", 0.0, BYTE)
    for text, score in _SPM_PIECES:
        add(text, score, NORMAL)
    return {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.pre": "default",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": scores,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.bos_token_id": 2,
        "tokenizer.ggml.eos_token_id": 1,
        "tokenizer.ggml.unknown_token_id": 3,
        "tokenizer.ggml.padding_token_id": 0,
        "tokenizer.ggml.add_bos_token": True,
        "tokenizer.ggml.add_eos_token": False,
        "tokenizer.ggml.add_space_prefix": False,
        "tokenizer.chat_template": SPM_CHAT_TEMPLATE,
    }


def gpt2_byte_chars() -> list[str]:
    """GPT-2's byte -> character map: printable Latin-1 bytes stand for themselves, the rest from U+0100."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars, extra = [], 0
    for byte in range(256):
        if byte in printable:
            chars.append(chr(byte))
        else:
            chars.append(chr(0x100 + extra))
            extra += 1
    return chars


# Merges in rank order (lower rank merges first). 'Ġ' is the byte-level space. Chosen so that tests can
# tell rank order from left-to-right order ('xyz' -> x + yz) and see the pre-tokenizer at work: Qwen2's
# splits digits one by one, so the '1 2' merge never applies.
_BPE_MERGES = [
    "\u0120 t", "h e", "\u0120t he", "\u0120 w", "o r", "\u0120w or", "l d", "\u0120wor ld", "i n",
    "\u0120 a", "y z", "x y", "1 2", "\u0120 h", "e l", "l o", "el lo", "\u0120h ello", "\u010a \u010a",
]


def tiny_bpe_metadata() -> dict:
    """A Qwen2.5-like byte-level BPE vocabulary ('gpt2' model, 'qwen2' pre-tokenizer) of 280 tokens."""
    tokens = gpt2_byte_chars() + [merge.replace(" ", "") for merge in _BPE_MERGES]
    types = [NORMAL] * len(tokens)
    specials = [("<|endoftext|>", CONTROL), ("<|im_start|>", CONTROL), ("<|im_end|>", CONTROL),
                ("<tool_call>", USER_DEFINED), ("</tool_call>", USER_DEFINED)]
    for text, token_type in specials:
        tokens.append(text)
        types.append(token_type)
    endoftext = tokens.index("<|endoftext|>")
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "qwen2",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": list(_BPE_MERGES),
        "tokenizer.ggml.bos_token_id": endoftext,
        "tokenizer.ggml.eos_token_id": tokens.index("<|im_end|>"),
        "tokenizer.ggml.padding_token_id": endoftext,
        "tokenizer.ggml.add_bos_token": False,
        "tokenizer.chat_template": BPE_CHAT_TEMPLATE,
    }
