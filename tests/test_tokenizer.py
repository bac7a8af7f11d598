"""Tokenizer tests: tiny vocabularies for the mechanics, real models for exact parity with llama.cpp.

The parity hashes were computed with llama.cpp itself (llama-cpp-python 0.3.36,
Llama(vocab_only=True).tokenize(bytes, add_bos=True, special=False)), so these tests need no llama.cpp.
"""

from __future__ import annotations

import hashlib
import time

import numpy as np
import pytest

from edgelm.errors import TokenizerError
from edgelm.tokenizer import Tokenizer
from tests.tiny_vocab import tiny_bpe_metadata, tiny_spm_metadata


@pytest.fixture(scope="module")
def spm() -> Tokenizer:
    return Tokenizer.from_metadata(tiny_spm_metadata(), source="tiny-spm")


@pytest.fixture(scope="module")
def bpe() -> Tokenizer:
    return Tokenizer.from_metadata(tiny_bpe_metadata(), source="tiny-bpe")


def texts(tokenizer: Tokenizer, text: str | bytes, **kwargs) -> list[str]:
    return [tokenizer.tokens[i] for i in tokenizer.encode(text, **kwargs)]


def ids_digest(ids: list[int]) -> str:
    return hashlib.sha256(np.array(ids, dtype="<i4").tobytes()).hexdigest()


# -- SentencePiece (SPM) -------------------------------------------------------------------------------------
def test_spm_merges_by_score_not_left_to_right(spm):
    assert texts(spm, "xyz", add_bos=False) == ["x", "yz"]  # 'yz' scores higher than 'xy'
    assert texts(spm, "que", add_bos=False) == ["qu", "e"]  # equal scores: the leftmost pair merges first
    assert texts(spm, " hello world", add_bos=False) == ["\u2581he", "ll", "o", "\u2581world"]


def test_spm_no_space_prefix_when_the_vocab_says_so(spm):
    assert texts(spm, "the cat sat", add_bos=False) == ["t", "he", "\u2581cat", "\u2581sat"]


def test_spm_space_prefix_as_llama_cpp():
    tokenizer = Tokenizer.from_metadata({**tiny_spm_metadata(), "tokenizer.ggml.add_space_prefix": True})
    ids = tokenizer.encode("hello world")
    assert [tokenizer.tokens[i] for i in ids] == ["<bos>", "\u2581he", "ll", "o", "\u2581world"]
    assert tokenizer.decode(ids[1:]) == "hello world"  # the added space is dropped again
    # llama.cpp prefixes every text fragment that follows a special token.
    assert texts(tokenizer, "a\nb", add_bos=False) == ["\u2581a", "\n", "\u2581", "b"]


def test_spm_token_spanning_a_word_boundary(spm):
    # '>▁</' crosses the boundary between the words 'a>' and '▁</b': words cannot be merged separately there.
    assert texts(spm, "a> </b", add_bos=False) == ["a", ">\u2581</", "b"]
    assert texts(spm, "a>b </b", add_bos=False) == ["a", ">", "b", "\u2581", "</", "b"]


def test_spm_byte_fallback(spm):
    assert texts(spm, "é", add_bos=False) == ["<0xC3>", "<0xA9>"]
    assert texts(spm, "🎉", add_bos=False) == ["<0xF0>", "<0x9F>", "<0x8E>", "<0x89>"]


def test_spm_bos(spm):
    assert spm.add_bos and spm.bos_id == 2
    assert spm.encode("x")[0] == 2
    assert spm.encode("x", add_bos=False)[0] != 2
    assert spm.encode("") == [2] and spm.encode("", add_bos=False) == []


def test_user_defined_tokens_are_always_split_longest_first(spm):
    got = texts(spm, "hi\n\nthere  x<b>y\n", add_bos=False)
    assert got == ["h", "i", "\n\n", "t", "he", "r", "e", "  ", "x", "<b>", "y", "\n"]


def test_control_tokens_only_with_parse_special(spm):
    plain = texts(spm, "<start_of_turn>user", add_bos=False)
    assert "<start_of_turn>" not in plain and plain[:2] == ["<", "s"]
    assert texts(spm, "<start_of_turn>user", add_bos=False, parse_special=True) == [
        "<start_of_turn>", "u", "s", "e", "r"]


def test_spm_decode_and_token_bytes(spm):
    text = "the cat sat\n\non a  mat é🎉<b>"
    ids = spm.encode(text)
    assert spm.decode(ids[1:]) == text
    assert spm.decode(ids) == "<bos>" + text
    assert spm.decode(ids, skip_special=True) == text
    assert spm.token_bytes(spm.tokens.index("\u2581cat")) == b" cat"
    assert spm.token_bytes(spm.tokens.index("<0xC3>")) == b"\xc3"
    assert spm.token_bytes(spm.tokens.index("<end_of_turn>")) == b"<end_of_turn>"
    with pytest.raises(TokenizerError, match="outside the vocabulary"):
        spm.token_bytes(spm.vocab_size)


def test_spm_end_of_generation_ids(spm):
    assert spm.eos_id == 1
    assert spm.eos_ids == {1, spm.tokens.index("<end_of_turn>")}


# -- byte-level BPE --------------------------------------------------------------------------------------------
def test_bpe_merges_by_rank(bpe):
    assert texts(bpe, "xyz") == ["x", "yz"]  # 'y z' ranks before 'x y'
    assert texts(bpe, "hello") == ["he", "l", "lo"]  # 'h e' and 'l o' rank before 'e l'
    assert texts(bpe, " the world") == ["\u0120the", "\u0120world"]


def test_bpe_qwen2_pre_tokenizer(bpe):
    assert bpe.add_bos is False and bpe.encode("the")[0] != bpe.bos_id
    assert texts(bpe, "12") == ["1", "2"]  # digits are pre-tokenized one by one: the '1 2' merge never applies
    assert texts(bpe, "a  the") == ["a", "\u0120", "\u0120the"]  # \s+(?!\S) leaves the last space to the word
    assert texts(bpe, "a\n\nb") == ["a", "\u010a\u010a", "b"]
    assert texts(bpe, "é") == ["\u00c3", "\u00a9"]  # byte-level characters of b'\xc3\xa9'


@pytest.mark.parametrize("pre, expected", [("gpt-2", ["12", "3", "4"]), ("llama-bpe", ["12", "3", "4"]),
                                           ("default", ["12", "3", "4"]), ("qwen2", ["1", "2", "3", "4"])])
def test_bpe_pre_tokenizer_by_name(pre, expected):
    tokenizer = Tokenizer.from_metadata({**tiny_bpe_metadata(), "tokenizer.ggml.pre": pre})
    assert texts(tokenizer, "1234", add_bos=False) == expected


def test_bpe_special_tokens(bpe):
    assert texts(bpe, "<tool_call>x<|im_end|>")[:2] == ["<tool_call>", "x"]
    assert "<|im_end|>" not in texts(bpe, "<tool_call>x<|im_end|>")
    assert texts(bpe, "<tool_call>x<|im_end|>", parse_special=True) == ["<tool_call>", "x", "<|im_end|>"]


def test_bpe_decode_and_end_of_generation(bpe):
    text = "hello  world\n\n12 é🎉 <tool_call>"
    assert bpe.decode(bpe.encode(text)) == text
    assert bpe.token_bytes(bpe.tokens.index("\u0120")) == b" "
    assert bpe.eos_ids == {bpe.tokens.index("<|im_end|>"), bpe.tokens.index("<|endoftext|>")}


def test_invalid_utf8_bytes_are_tokenized(spm, bpe):
    assert texts(spm, b"a\xff", add_bos=False) == ["a", "<0xFF>"]
    assert bpe.decode(bpe.encode(b"a\xff")) == "a\ufffd"


# -- metadata errors -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("key", ["tokenizer.ggml.tokens", "tokenizer.ggml.model"])
def test_missing_key_is_named(key):
    metadata = tiny_spm_metadata()
    del metadata[key]
    with pytest.raises(TokenizerError, match=key.replace(".", r"\.")):
        Tokenizer.from_metadata(metadata, source="model.gguf")


def test_missing_merges_are_named():
    metadata = tiny_bpe_metadata()
    del metadata["tokenizer.ggml.merges"]
    with pytest.raises(TokenizerError, match=r"tokenizer\.ggml\.merges"):
        Tokenizer.from_metadata(metadata)


def test_unknown_model_and_pre_tokenizer_are_named():
    with pytest.raises(TokenizerError, match="'bert'"):
        Tokenizer.from_metadata({**tiny_spm_metadata(), "tokenizer.ggml.model": "bert"})
    with pytest.raises(TokenizerError, match="'mystery-pre'"):
        Tokenizer.from_metadata({**tiny_bpe_metadata(), "tokenizer.ggml.pre": "mystery-pre"})


def test_inconsistent_metadata_is_rejected():
    metadata = tiny_spm_metadata()
    metadata["tokenizer.ggml.scores"] = metadata["tokenizer.ggml.scores"][:10]
    with pytest.raises(TokenizerError, match=r"tokenizer\.ggml\.scores"):
        Tokenizer.from_metadata(metadata)
    with pytest.raises(TokenizerError, match=r"tokenizer\.ggml\.tokens' holds a str"):
        Tokenizer.from_metadata({**tiny_bpe_metadata(), "tokenizer.ggml.tokens": "abc"})


# -- streaming detokenizer -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["spm", "bpe"])
def test_streaming_never_splits_a_character(name, request):
    tokenizer = request.getfixturevalue(name)
    text = "the 🎉 日本 é cat"
    ids = tokenizer.encode(text, add_bos=False)
    detokenizer = tokenizer.detokenizer()
    increments = [detokenizer.add(i) for i in ids]
    increments.append(detokenizer.finalize())
    assert "".join(increments) == detokenizer.text == tokenizer.decode(ids) == text
    assert all("\ufffd" not in part for part in increments)
    assert increments.count("") >= 3  # the emoji's bytes were held back until it was complete


def test_streaming_flushes_an_unfinished_character(spm):
    detokenizer = spm.detokenizer()
    assert detokenizer.add(spm.tokens.index("<0xF0>")) == ""
    assert detokenizer.finalize() == "\ufffd"


# -- chat templates -------------------------------------------------------------------------------------------
def test_chat_template_renders_with_special_token_variables(spm):
    messages = [{"role": "user", "content": "Hi "}, {"role": "assistant", "content": "Hello"}]
    assert spm.apply_chat_template(messages) == (
        "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\nHello<end_of_turn>\n"
        "<start_of_turn>model\n")
    assert spm.apply_chat_template(messages, add_generation_prompt=False).endswith("Hello<end_of_turn>\n")


def test_chat_template_helpers():
    template = ("{% if messages | length > 1 %}{{ raise_exception('only one message') }}{% endif %}"
                "{{ messages[0] | tojson }}|{{ strftime_now('%Y') | length }}")
    tokenizer = Tokenizer.from_metadata({**tiny_bpe_metadata(), "tokenizer.chat_template": template})
    assert tokenizer.apply_chat_template([{"role": "user", "content": "<é>"}]) == \
        '{"role": "user", "content": "<é>"}|4'
    with pytest.raises(TokenizerError, match="only one message"):
        tokenizer.apply_chat_template([{"role": "user", "content": "a"}] * 2)


def test_missing_chat_template_suggests_generate():
    metadata = tiny_spm_metadata()
    del metadata["tokenizer.chat_template"]
    tokenizer = Tokenizer.from_metadata(metadata, source="base.gguf")
    assert tokenizer.chat_template is None
    with pytest.raises(TokenizerError, match="no chat template.*edgelm generate"):
        tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])


# -- llama.cpp as the reference, on tiny models written here ---------------------------------------------
TRICKY_TEXTS = ["", " ", "Hello world", "  the cat  sat  ", "a> </b x> </y", "xyz que", "don't I'LL we've",
                "12345 3.14", "日本語 🎉😀 é", "<start_of_turn>user\nhi<end_of_turn>\n", "<|im_start|>a<|im_end|>",
                "<tool_call>x</tool_call> <b>", "\r\n\r\n \t x", "a\u00a0b\u2003c", "$1+2=<3>"]


@pytest.mark.llama_cpp
@pytest.mark.parametrize("arch", ["gemma3", "qwen2"])
def test_tiny_vocab_matches_llama_cpp(arch, tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp")
    from tests.tiny_gguf import TinyConfig, write_tiny_model

    path = write_tiny_model(tmp_path / f"{arch}.gguf", TinyConfig(arch))
    reference = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    tokenizer = Tokenizer.from_metadata(tiny_spm_metadata() if arch == "gemma3" else tiny_bpe_metadata())
    for text in TRICKY_TEXTS:
        for parse_special in (False, True):
            expected = reference.tokenize(text.encode(), add_bos=True, special=parse_special)
            assert tokenizer.encode(text, parse_special=parse_special) == expected, (text, parse_special)


# -- real models: exact parity with llama.cpp on wikitext-2 ----------------------------------------------------
def load_tokenizer(path) -> Tokenizer:
    from edgelm.io.gguf import GGUFFile

    return Tokenizer.from_metadata(GGUFFile(path).metadata, source=str(path))


# Whole wiki.test.raw as bytes (CRLF kept), llama.cpp tokenize(add_bos=True, special=False). Without the
# file's final b"\n", as llama-perplexity reads it, Gemma gives 295,172 tokens.
WIKI_PARITY = {
    "gemma": (295_173, "668a8c8b49c889ce07c1744d181e8d7b61406b3789fa0cc3eededf5e53f5c842"),
    "qwen": (298_938, "e80fc69605cf20815797cf4d19f7a1eab6b965f77f271c17cd16bd1993ab7dbf"),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gemma", "qwen"])
def test_wikitext_tokens_equal_llama_cpp(name, request, wiki_test):
    tokenizer = load_tokenizer(request.getfixturevalue(f"{name}_path"))
    data = wiki_test.read_bytes()
    start = time.perf_counter()
    ids = tokenizer.encode(data)
    seconds = time.perf_counter() - start
    count, digest = WIKI_PARITY[name]
    assert (len(ids), ids_digest(ids)) == (count, digest)
    assert seconds < 10, f"tokenizing {len(data)} bytes took {seconds:.1f} s"
    body = ids[1:] if tokenizer.add_bos else ids
    assert tokenizer.decode(body).encode() == data


@pytest.mark.slow
def test_real_model_special_tokens(gemma_path, qwen_path):
    gemma, qwen = load_tokenizer(gemma_path), load_tokenizer(qwen_path)
    assert (gemma.bos_id, gemma.eos_id, gemma.add_bos) == (2, 1, True)
    assert gemma.eos_ids == {1, 106, 212}  # <eos>, <end_of_turn> and '</s>' (llama.cpp's EOG texts)
    assert (qwen.bos_id, qwen.eos_id, qwen.add_bos) == (151643, 151645, False)
    # <|endoftext|>, <|im_end|>, the FIM pad/repo/file-separator tokens, and a normal token '</s>'.
    assert qwen.eos_ids == {151643, 151645, 151662, 151663, 151664, 128247}
    assert gemma.encode("<start_of_turn>user\n", add_bos=False, parse_special=True) == [105, 2364, 107]


@pytest.mark.slow
def test_real_streaming_detokenizer_over_byte_fallback(gemma_path):
    gemma = load_tokenizer(gemma_path)
    text = "Tea \U0001FAE8 and x-ray \U0001FA7B, 𠀋𠂢 ꙮ, 日本語 🎉."
    ids = gemma.encode(text, add_bos=False)
    assert len(ids) > len(text.encode()) // 2  # the rare characters fell back to byte tokens
    detokenizer = gemma.detokenizer()
    increments = [detokenizer.add(i) for i in ids] + [detokenizer.finalize()]
    assert "".join(increments) == gemma.decode(ids) == text
    assert all("\ufffd" not in part for part in increments)


@pytest.mark.slow
def test_qwen_chat_template(qwen_path, gemma_path):
    qwen = load_tokenizer(qwen_path)
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi!"}]
    assert qwen.apply_chat_template(messages, add_generation_prompt=True) == (
        "<|im_start|>system\nYou are terse.<|im_end|>\n"
        "<|im_start|>user\nHi!<|im_end|>\n"
        "<|im_start|>assistant\n")
    with pytest.raises(TokenizerError, match="no chat template"):
        load_tokenizer(gemma_path).apply_chat_template(messages)


def test_vocabulary_lookups_duplicates_and_pickling():
    import pickle

    from edgelm.tokenizer import Vocabulary

    texts = ["<s>", "a", "\u2581b", "ab\u2581c", "ü", "a", "\ud800x", "", "\u2581\u2581"]
    vocab = Vocabulary(texts)
    assert len(vocab) == len(texts) and list(vocab) == texts and vocab[-1] == texts[-1]
    assert vocab.get("a") == 5  # the last of duplicate texts, as llama.cpp's token_to_id
    assert vocab.get("ü") == 4 and vocab.get("\ud800x") == 6 and vocab.get("") == 7
    assert vocab.get("zz") is None and vocab.get("zz", -1) == -1 and "zz" not in vocab and "ab\u2581c" in vocab
    assert vocab.index("a") == 1  # a Sequence: first occurrence
    assert vocab.ids_containing("\u2581") == [2, 3, 8]
    assert vocab.ids_containing("\u2581", after_start=True) == [3, 8]
    with pytest.raises(IndexError, match="outside the vocabulary"):
        vocab[len(texts)]
    restored = pickle.loads(pickle.dumps(vocab))  # string hashes are per process: the index is rebuilt
    assert [restored.get(t) for t in texts] == [vocab.get(t) for t in texts]


def test_metadata_round_trip_gives_the_token_list(spm):
    rebuilt = Tokenizer.from_metadata(spm.metadata, source="again")
    assert spm.metadata["tokenizer.ggml.tokens"] == list(spm.tokens)
    assert rebuilt.encode("hello world") == spm.encode("hello world")
