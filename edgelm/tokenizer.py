"""Tokenizers built from GGUF metadata that reproduce llama.cpp's tokenization exactly.

Two vocabulary types are supported, as in llama.cpp's src/llama-vocab.cpp:

* SPM (`tokenizer.ggml.model = llama`, e.g. Gemma 3): spaces become '▁', then symbols are merged pairwise by
  token score (highest first, leftmost on ties); characters that never form a token fall back to
  `<0xNN>` byte tokens.
* BPE (`tokenizer.ggml.model = gpt2`, e.g. Qwen2.5, Llama 3): a pre-tokenizer regex chosen by
  `tokenizer.ggml.pre` splits the text into words, each word is mapped to GPT-2 byte-level characters and
  merged by merge rank.

Both first partition the text at special tokens (llama.cpp's tokenizer_st_partition): user-defined tokens
always, control tokens only with parse_special=True. Words are merged independently of each other, so
their ids are cached per word, which is what makes pure Python fast enough for whole evaluation files.
"""

from __future__ import annotations

import codecs
import enum
import heapq
import json
from array import array
from bisect import bisect_left
from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime
from typing import Any

import regex

from edgelm.errors import TokenizerError

SPACE_MARK = "\u2581"  # '▁', SentencePiece's escaped space


class TokenAttr(enum.IntFlag):
    """llama.cpp's per-token attributes (llama_token_attr), derived from the GGUF token types."""

    UNDEFINED = 0
    UNKNOWN = 1 << 0
    UNUSED = 1 << 1
    NORMAL = 1 << 2
    CONTROL = 1 << 3
    USER_DEFINED = 1 << 4
    BYTE = 1 << 5


# Special tokens that are split out of the text only with parse_special, and left out by skip_special.
_PARSED_SPECIAL = TokenAttr.CONTROL | TokenAttr.UNKNOWN

# GGUF tokenizer.ggml.token_type values -> attributes (llama_token_type: 0 undefined ... 6 byte).
_ATTR_OF_TOKEN_TYPE = {0: TokenAttr.UNDEFINED, 1: TokenAttr.NORMAL, 2: TokenAttr.UNKNOWN, 3: TokenAttr.CONTROL,
                       4: TokenAttr.USER_DEFINED, 5: TokenAttr.UNUSED, 6: TokenAttr.BYTE}

# Token texts llama.cpp treats as end of generation (and forces to CONTROL), whatever the file says.
_EOG_TEXTS = frozenset({
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>",
    "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]",
    "<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>",
    "<\uff5cend\u2581of\u2581sentence\uff5c>", "[e~[",
})
# Fill-in-the-middle tokens found by text when the metadata has no id for them; pad/repo/file-separator
# also end generation in llama.cpp.
_FIM_TEXTS = {
    "tokenizer.ggml.fim_pre_token_id": ("<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>",
                                        "<\uff5cfim\u2581begin\uff5c>", "<PRE>", "\u2581<PRE>",
                                        "<|code_prefix|>", "<|prefix|>"),
    "tokenizer.ggml.fim_suf_token_id": ("<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>",
                                        "<\uff5cfim\u2581hole\uff5c>", "<SUF>", "\u2581<SUF>",
                                        "<|code_suffix|>", "<|suffix|>"),
    "tokenizer.ggml.fim_mid_token_id": ("<|fim_middle|>", "<fim-middle>", "<fim_middle>",
                                        "<\uff5cfim\u2581end\uff5c>", "<MID>", "\u2581<MID>",
                                        "<|code_middle|>", "<|middle|>"),
    "tokenizer.ggml.fim_pad_token_id": ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"),
    "tokenizer.ggml.fim_rep_token_id": ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"),
    "tokenizer.ggml.fim_sep_token_id": ("<|file_sep|>",),
}
_FIM_KEYS_ENDING_GENERATION = ("tokenizer.ggml.fim_pad_token_id", "tokenizer.ggml.fim_rep_token_id",
                               "tokenizer.ggml.fim_sep_token_id")

# Pre-tokenizer regexes, as llama.cpp writes them for each tokenizer.ggml.pre (Python's `regex` matches
# them the same way: \s is Unicode White_Space, alternatives are tried left to right).
_CONTRACTIONS_ANY_CASE = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_QWEN2_REGEX = (_CONTRACTIONS_ANY_CASE + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_LLAMA3_REGEX = (_CONTRACTIONS_ANY_CASE + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_DEFAULT_REGEXES = (r"[\p{P}\$\+<=>\^~\|]+", _GPT2_REGEX, r"\p{N}+", r"[0-9][0-9][0-9]")


class _PreTokenizer:
    """A BPE pre-tokenizer: its regexes split the text in turn; text between matches stays a piece too."""

    def __init__(self, regexes: tuple[str, ...], ignore_merges: bool = False, add_bos: bool = False):
        self.patterns = [regex.compile(r) for r in regexes]
        self.ignore_merges = ignore_merges  # a word that is a token as a whole is not merged
        self.add_bos = add_bos  # llama.cpp's default when tokenizer.ggml.add_bos_token is absent

    def split(self, text: str) -> list[str]:
        pieces = [text]
        for pattern in self.patterns:
            pieces = [part for piece in pieces for part in _split_keeping_gaps(pattern, piece)]
        return pieces


def _split_keeping_gaps(pattern: regex.Pattern, text: str) -> list[str]:
    parts, end = [], 0
    for match in pattern.finditer(text):
        if match.start() > end:
            parts.append(text[end:match.start()])
        parts.append(match.group())
        end = match.end()
    if end < len(text):
        parts.append(text[end:])
    return parts


_QWEN2 = _PreTokenizer((_QWEN2_REGEX,))
_LLAMA3 = _PreTokenizer((_LLAMA3_REGEX,), ignore_merges=True, add_bos=True)
_GPT2 = _PreTokenizer((_GPT2_REGEX,))
_DEFAULT = _PreTokenizer(_DEFAULT_REGEXES)
_PRE_TOKENIZERS = {
    "qwen2": _QWEN2, "deepseek-r1-qwen": _QWEN2, "megrez": _QWEN2, "stablelm2": _QWEN2,
    "llama3": _LLAMA3, "llama-v3": _LLAMA3, "llama-bpe": _LLAMA3, "falcon3": _LLAMA3,
    "dbrx": _PreTokenizer((_LLAMA3_REGEX,)), "smaug-bpe": _PreTokenizer((_LLAMA3_REGEX,)),
    "gpt-2": _GPT2, "phi-2": _GPT2, "mpt": _GPT2, "olmo": _GPT2,
    "default": _DEFAULT,
}


def _gpt2_byte_chars() -> list[str]:
    """GPT-2's byte -> printable character map (printable Latin-1 bytes map to themselves)."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars, extra = [""] * 256, 0
    for byte in range(256):
        if byte in printable:
            chars[byte] = chr(byte)
        else:
            chars[byte] = chr(256 + extra)
            extra += 1
    return chars


_BYTE_TO_GPT2_CHAR = _gpt2_byte_chars()
_GPT2_CHAR_TO_BYTE = {char: byte for byte, char in enumerate(_BYTE_TO_GPT2_CHAR)}


_WORD_CACHE_LIMIT = 1 << 18  # words; the cache starts over when full, so memory stays bounded


def _text_bytes(text: str) -> bytes:
    # Token texts and input text keep undecodable bytes as surrogate escapes (see GGUF reading, encode()).
    return text.encode("utf-8", "surrogateescape")


_INVALID_UTF8 = regex.compile("[\udc80-\udcff]")  # surrogate escapes of undecodable bytes


def _has_invalid_utf8(text: str) -> bool:
    return not text.isascii() and _INVALID_UTF8.search(text) is not None


_UTF8_LENGTH_BY_HIGH_NIBBLE = (1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 3, 4)


def _utf8_symbols(data: bytes) -> list[bytes]:
    """Split bytes where llama.cpp does (unicode_len_utf8 of each lead byte), valid UTF-8 or not."""
    symbols, i = [], 0
    while i < len(data):
        length = _UTF8_LENGTH_BY_HIGH_NIBBLE[data[i] >> 4]
        symbols.append(data[i:i + length])
        i += length
    return symbols


class Vocabulary(Sequence):
    """Token texts by id and ids by text, in a few flat arrays.

    A 262k-token vocabulary held as a list of Python strings plus a text -> id dict costs ~45 MB of heap;
    here the texts are one UTF-8 buffer with offsets, and the index is the sorted array of their string
    hashes with the matching ids (~6 MB). A lookup is a binary search and a comparison (~1 us; words are
    cached above it). As llama.cpp's token_to_id map, the last of duplicate texts wins.
    """

    def __init__(self, texts: list[str]):
        import numpy as np

        n = len(texts)
        lengths = np.fromiter((len(t.encode("utf-8", "surrogatepass")) for t in texts), np.int64, n)
        offsets = np.zeros(n + 1, np.int32)  # (a vocabulary's texts are megabytes, not gigabytes)
        np.cumsum(lengths, out=offsets[1:])
        self._blob = "".join(texts).encode("utf-8", "surrogatepass")
        self._offsets = _array_of("i", offsets)
        self._build_index(texts)

    def _build_index(self, texts: Iterable[str]) -> None:
        import numpy as np

        # str hashes differ between processes (PYTHONHASHSEED): the index is rebuilt after unpickling.
        hashes = np.fromiter(map(hash, texts), np.int64, len(self))
        order = np.argsort(hashes, kind="stable")  # equal hashes keep ascending ids
        self._hashes = _array_of("q", hashes[order])
        self._ids = _array_of("i", order.astype(np.int32))

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, token_id: int) -> str:
        if not -len(self) <= token_id < len(self):
            raise IndexError(f"token id {token_id} is outside the vocabulary (0..{len(self) - 1})")
        token_id %= len(self)
        return self._blob[self._offsets[token_id]:self._offsets[token_id + 1]].decode("utf-8", "surrogatepass")

    def __iter__(self) -> Iterator[str]:
        return (self[i] for i in range(len(self)))

    def __contains__(self, text: object) -> bool:
        return isinstance(text, str) and self.get(text) is not None

    def get(self, text: str, default: int | None = None) -> int | None:
        """The id of `text`, or `default` when no token has that text."""
        h = hash(text)
        hashes, ids = self._hashes, self._ids
        found = default
        i = bisect_left(hashes, h)
        while i < len(hashes) and hashes[i] == h:
            if self[ids[i]] == text:
                found = ids[i]
            i += 1
        return found

    def ids_containing(self, text: str, after_start: bool = False) -> list[int]:
        """Ids of the tokens whose text contains `text` (not only as their first characters: `after_start`)."""
        import numpy as np

        needle = np.frombuffer(text.encode("utf-8", "surrogatepass"), np.uint8)
        data = np.frombuffer(self._blob, np.uint8)
        if len(needle) == 0 or len(data) < len(needle):
            return []
        hit = data[:len(data) - len(needle) + 1] == needle[0]
        for k in range(1, len(needle)):
            hit &= data[k:len(data) - len(needle) + 1 + k] == needle[k]
        starts = np.nonzero(hit)[0]
        offsets = np.frombuffer(self._offsets, np.int32).astype(np.int64)
        owner = np.searchsorted(offsets, starts, side="right") - 1
        ends_inside = starts + len(needle) <= offsets[owner + 1]  # not straddling two tokens
        keep = ends_inside & ((starts > offsets[owner]) if after_start else True)
        return sorted(set(owner[keep].tolist()))

    def __getstate__(self) -> dict:
        return {"blob": self._blob, "offsets": self._offsets}

    def __setstate__(self, state: dict) -> None:
        self._blob, self._offsets = state["blob"], state["offsets"]
        self._build_index(iter(self))


def _array_of(typecode: str, values) -> array:
    """A numpy array's values as a compact stdlib array (indexing it from Python is several times faster)."""
    out = array(typecode)
    if out.itemsize != values.dtype.itemsize:
        raise ValueError(f"array('{typecode}') cannot hold {values.dtype}")
    out.frombytes(values.tobytes())
    return out


class _SpmWords:
    """llama.cpp's llm_tokenizer_spm on one escaped text fragment, cached per word.

    The bigram merge never joins two words unless a token with '▁' after its first character spans the
    boundary; such tokens are rare (one in Gemma 3's vocabulary), so words are merged separately and only
    the boundaries inside an occurrence of a spanning token keep their words together.
    """

    _WORD = regex.compile(SPACE_MARK + "[^" + SPACE_MARK + "]*|[^" + SPACE_MARK + "]+")

    def __init__(self, vocab: Vocabulary, scores: array, byte_tokens: list[int | None]):
        self.vocab = vocab
        self.scores = scores
        self.byte_tokens = byte_tokens
        spanning = sorted((vocab[i] for i in vocab.ids_containing(SPACE_MARK, after_start=True)), key=len, reverse=True)
        self.spanning = regex.compile("|".join(map(regex.escape, spanning))) if spanning else None
        self.cache: dict[str, list[int]] = {}

    def encode(self, text: str) -> list[int]:
        if _has_invalid_utf8(text):
            # llama.cpp cuts symbols by the length a UTF-8 lead byte announces, even across words.
            return self._merge(_utf8_symbols(_text_bytes(text)))
        ids: list[int] = []
        cache = self.cache
        for word in self._words(text):
            word_ids = cache.get(word)
            if word_ids is None:
                if len(cache) >= _WORD_CACHE_LIMIT:
                    cache.clear()
                word_ids = cache[word] = self._merge(list(word))
            ids.extend(word_ids)
        return ids

    def _words(self, text: str) -> list[str]:
        if self.spanning is None or self.spanning.search(text) is None:
            return self._WORD.findall(text)
        joined = set()  # positions of '▁' that do not start a new word
        for match in self.spanning.finditer(text, overlapped=True):
            joined.update(i for i in range(match.start() + 1, match.end()) if text[i] == SPACE_MARK)
        starts = [0] + [i for i, c in enumerate(text) if c == SPACE_MARK and i > 0 and i not in joined]
        return [text[a:b] for a, b in zip(starts, starts[1:] + [len(text)])]

    def _merge(self, symbols: list[str] | list[bytes]) -> list[int]:
        """Merge characters (or, for invalid UTF-8, llama.cpp's byte symbols) into tokens."""
        def lookup(symbol: str | bytes) -> int | None:
            if isinstance(symbol, bytes):
                symbol = symbol.decode("utf-8", "surrogateescape")
            return self.vocab.get(symbol)

        n = len(symbols)
        prev = list(range(-1, n - 1))
        next_ = list(range(1, n + 1))
        next_[-1] = -1
        queue: list[tuple[float, int, int, int]] = []  # (-score, left, right, merged length)

        def add_bigram(left: int, right: int) -> None:
            if left < 0 or right < 0:
                return
            merged = symbols[left] + symbols[right]
            token = lookup(merged)
            if token is not None:
                heapq.heappush(queue, (-self.scores[token], left, right, len(merged)))

        for i in range(1, n):
            add_bigram(i - 1, i)
        while queue:
            _, left, right, length = heapq.heappop(queue)
            # Skip bigrams whose symbols have changed since they were queued.
            if not symbols[left] or not symbols[right] or len(symbols[left]) + len(symbols[right]) != length:
                continue
            symbols[left] += symbols[right]
            symbols[right] = symbols[right][:0]  # emptied: merged into its left neighbour
            next_[left] = next_[right]
            if next_[right] >= 0:
                prev[next_[right]] = left
            add_bigram(prev[left], left)
            add_bigram(left, next_[left])

        ids = []
        for symbol in symbols:
            if not symbol:
                continue
            token = lookup(symbol)
            if token is not None:
                ids.append(token)
            else:
                ids.extend(self._byte_token(b) for b in (symbol if isinstance(symbol, bytes) else _text_bytes(symbol)))
        return ids

    def _byte_token(self, byte: int) -> int:
        token = self.byte_tokens[byte]
        if token is None:
            raise TokenizerError(f"cannot encode byte 0x{byte:02X}: the vocabulary has no byte token "
                                 f"<0x{byte:02X}>; the model's tokenizer metadata is incomplete")
        return token


class _BpeWords:
    """llama.cpp's llm_tokenizer_bpe on one text fragment: pre-tokenize, byte-map, merge; cached per word."""

    def __init__(self, vocab: Vocabulary, merges: list[str], pre: _PreTokenizer):
        self.vocab = vocab
        self.ranks: dict[str, int] = {}
        for rank, merge in enumerate(merges):
            self.ranks.setdefault(merge, rank)  # the first of duplicate merges counts, as in llama.cpp
        self.pre = pre
        self.cache: dict[str, list[int]] = {}

    def encode(self, text: str) -> list[int]:
        if _has_invalid_utf8(text):  # llama.cpp reads each invalid byte as U+FFFD
            text = _INVALID_UTF8.sub("\ufffd", text)
        ids: list[int] = []
        cache = self.cache
        for word in self.pre.split(text):
            word_ids = cache.get(word)
            if word_ids is None:
                if len(cache) >= _WORD_CACHE_LIMIT:
                    cache.clear()
                word_ids = cache[word] = self._merge("".join(_BYTE_TO_GPT2_CHAR[b] for b in word.encode()))
            ids.extend(word_ids)
        return ids

    def _merge(self, word: str) -> list[int]:
        if self.pre.ignore_merges and (token := self.vocab.get(word)) is not None:
            return [token]
        symbols = list(word)
        n = len(symbols)
        prev = list(range(-1, n - 1))
        next_ = list(range(1, n + 1))
        next_[-1] = -1
        queue: list[tuple[int, int, int, str]] = []  # (rank, left, right, merged text)

        def add_bigram(left: int, right: int) -> None:
            if left < 0 or right < 0:
                return
            rank = self.ranks.get(symbols[left] + " " + symbols[right])
            if rank is not None:
                heapq.heappush(queue, (rank, left, right, symbols[left] + symbols[right]))

        for i in range(1, n):
            add_bigram(i - 1, i)
        while queue:
            _, left, right, merged = heapq.heappop(queue)
            if not symbols[left] or not symbols[right] or symbols[left] + symbols[right] != merged:
                continue  # outdated bigram
            symbols[left] = merged
            symbols[right] = ""
            next_[left] = next_[right]
            if next_[right] >= 0:
                prev[next_[right]] = left
            add_bigram(prev[left], left)
            add_bigram(left, next_[left])

        ids = []
        for symbol in symbols:
            if not symbol:
                continue
            token = self.vocab.get(symbol)
            if token is not None:
                ids.append(token)
            else:  # as llama.cpp: fall back to single-character tokens, drop what has none
                ids.extend(t for t in map(self.vocab.get, symbol) if t is not None)
        return ids


def _compact(value):
    """Long numeric lists of the metadata as arrays (the vocabulary's scores and types: 10 MB as lists)."""
    if isinstance(value, list) and len(value) > 1024:
        if all(type(v) is float for v in value[:64]):
            return array("f", value)
        if all(type(v) is int for v in value[:64]):
            return array("b" if all(-128 <= v < 128 for v in value) else "q", value)
    return value


class Tokenizer:
    """Text <-> token ids for one model, built with `Tokenizer.from_metadata(gguf.metadata)`."""

    def __init__(self, *, tokens: Vocabulary, attrs: array, words: _SpmWords | _BpeWords,
                 bos_id: int | None, eos_id: int | None, eos_ids: frozenset[int], add_bos: bool,
                 add_space_prefix: bool, chat_template: str | None, source: str):
        self.tokens = tokens
        self.attrs = attrs
        self.vocab_size = len(tokens)
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.eos_ids = eos_ids
        self.add_bos = add_bos
        self.add_space_prefix = add_space_prefix
        self.chat_template = chat_template
        self.source = source
        self._words = words
        self._is_spm = isinstance(words, _SpmWords)
        # Special tokens for the partition, longest first (llama.cpp's cache_special_tokens; it leaves the
        # order of equal lengths unspecified, here it is id order).
        mask = int(_PARSED_SPECIAL | TokenAttr.USER_DEFINED)  # a plain int: IntFlag's & is slow for 262k tokens
        special = [i for i, a in enumerate(attrs) if a & mask]
        special.sort(key=lambda i: -len(tokens[i]))
        self._always_split = [(tokens[i], i) for i in special if not attrs[i] & _PARSED_SPECIAL]
        self._split_when_parsing = [(tokens[i], i) for i in special]
        self._piece_cache: dict[int, bytes] = {}
        self._template = None

    @property
    def metadata(self) -> dict:
        """The tokenizer.* metadata it was built from (to write into a model directory or a GGUF)."""
        return {k: v.tolist() if isinstance(v, array) else list(v) if isinstance(v, Vocabulary) else v
                for k, v in self._metadata.items()}

    # -- construction ---------------------------------------------------------------------------------------
    @classmethod
    def from_metadata(cls, metadata: dict, source: str = "<metadata>") -> Tokenizer:
        """The tokenizer described by a GGUF file's tokenizer.* metadata, with llama.cpp's defaults."""
        reader = _MetadataReader(metadata, source)
        model = reader.require("tokenizer.ggml.model", str)
        tokens = reader.require("tokenizer.ggml.tokens", list)
        n = len(tokens)
        # float32 arrays, not lists of Python floats: 1 MB instead of 8 for a 262k vocabulary
        scores = array("f", reader.optional_list("tokenizer.ggml.scores", n) or [0.0] * n)
        token_types = reader.optional_list("tokenizer.ggml.token_type", n) or [1] * n
        # one byte per token (a list would hold a pointer per token: 2 MB for 262k)
        attrs = array("B", [_ATTR_OF_TOKEN_TYPE.get(t, TokenAttr.UNDEFINED) for t in token_types[:n]])
        vocab = Vocabulary(tokens)

        if model == "llama":
            byte_tokens = [vocab.get(f"<0x{b:02X}>", vocab.get(chr(b)) if b < 0x80 else None) for b in range(256)]
            words: _SpmWords | _BpeWords = _SpmWords(vocab, scores, byte_tokens)
            default_bos, default_eos, default_add_bos = 1, 2, True
            add_space_prefix = bool(metadata.get("tokenizer.ggml.add_space_prefix", True))
        elif model == "gpt2":
            pre_name = metadata.get("tokenizer.ggml.pre", "default")
            pre = _PRE_TOKENIZERS.get(pre_name)
            if pre is None:
                raise TokenizerError(f"{source}: unknown pre-tokenizer tokenizer.ggml.pre='{pre_name}'; edgelm "
                                     f"supports {', '.join(sorted(_PRE_TOKENIZERS))}")
            words = _BpeWords(vocab, reader.require("tokenizer.ggml.merges", list), pre)
            default_bos, default_eos, default_add_bos = 11, 11, pre.add_bos
            add_space_prefix = False
        else:
            raise TokenizerError(f"{source}: unsupported tokenizer model tokenizer.ggml.model='{model}'; edgelm "
                                 "supports 'llama' (SentencePiece) and 'gpt2' (byte-level BPE) vocabularies")

        bos_id = reader.token_id("tokenizer.ggml.bos_token_id", n, default_bos)
        eos_id = reader.token_id("tokenizer.ggml.eos_token_id", n, default_eos)
        add_bos = bool(metadata.get("tokenizer.ggml.add_bos_token", default_add_bos))
        if add_bos and bos_id is None:
            raise TokenizerError(f"{source}: tokenizer.ggml.add_bos_token is true, but "
                                 "tokenizer.ggml.bos_token_id is not set; the file is malformed, re-convert it")
        eos_ids = _end_of_generation_ids(reader, vocab, attrs, eos_id)
        tokenizer = cls(tokens=vocab, attrs=attrs, words=words, bos_id=bos_id, eos_id=eos_id, eos_ids=eos_ids,
                        add_bos=add_bos, add_space_prefix=add_space_prefix,
                        chat_template=metadata.get("tokenizer.chat_template"), source=source)
        # Kept so that compressed artifacts can carry the tokenizer: shared with the tokenizer where it can be,
        # long numeric lists as arrays.
        kept = {k: _compact(v) for k, v in metadata.items() if k.startswith("tokenizer.")}
        if "tokenizer.ggml.scores" in kept:
            kept["tokenizer.ggml.scores"] = scores
        kept["tokenizer.ggml.tokens"] = vocab  # not the list of strings it was built from
        tokenizer._metadata = kept
        return tokenizer

    # -- encoding -------------------------------------------------------------------------------------------
    def encode(self, text: str | bytes, add_bos: bool | None = None, parse_special: bool = False) -> list[int]:
        """Token ids of `text` (bytes are read as UTF-8), as llama_tokenize(text, add_bos, parse_special).

        add_bos=None follows the model (tokenizer.ggml.add_bos_token); an EOS token is never appended.
        """
        if isinstance(text, bytes):
            text = text.decode("utf-8", "surrogateescape")
        if add_bos is None:
            add_bos = self.add_bos
        if add_bos and self.bos_id is None:
            raise TokenizerError(f"{self.source}: the vocabulary has no BOS token; encode with add_bos=False")
        ids = [self.bos_id] if add_bos else []
        previous_is_special = True
        for fragment in self._partition(text, parse_special):
            if isinstance(fragment, int):
                ids.append(fragment)
                previous_is_special = True
            elif self._is_spm:
                if self.add_space_prefix and previous_is_special:
                    fragment = " " + fragment
                ids.extend(self._words.encode(fragment.replace(" ", SPACE_MARK)))
                previous_is_special = False
            else:
                ids.extend(self._words.encode(fragment))
        return ids

    def _partition(self, text: str, parse_special: bool) -> list[str | int]:
        """Split out special tokens, longest first, each everywhere it occurs in the remaining text."""
        fragments: list[str | int] = [text] if text else []
        for token_text, token in self._split_when_parsing if parse_special else self._always_split:
            if token_text not in text:
                continue
            split: list[str | int] = []
            for fragment in fragments:
                if isinstance(fragment, int) or token_text not in fragment:
                    split.append(fragment)
                    continue
                for i, part in enumerate(fragment.split(token_text)):
                    if i:
                        split.append(token)
                    if part:
                        split.append(part)
            fragments = split
        return fragments

    # -- decoding -------------------------------------------------------------------------------------------
    def token_bytes(self, token_id: int) -> bytes:
        """The bytes a token stands for; control tokens give their text (e.g. b'<end_of_turn>')."""
        piece = self._piece_cache.get(token_id)
        if piece is None:
            if not 0 <= token_id < self.vocab_size:
                raise TokenizerError(f"token id {token_id} is outside the vocabulary (0..{self.vocab_size - 1})")
            piece = self._piece_cache[token_id] = self._piece(token_id)
        return piece

    def _piece(self, token_id: int) -> bytes:
        # llama.cpp's token_to_piece with special=True.
        text, attr = self.tokens[token_id], self.attrs[token_id]
        if attr & (TokenAttr.UNKNOWN | TokenAttr.CONTROL | TokenAttr.USER_DEFINED):
            return _text_bytes(text)
        if attr & TokenAttr.NORMAL:
            if self._is_spm:
                return _text_bytes(text.replace(SPACE_MARK, " "))
            return b"".join(bytes([_GPT2_CHAR_TO_BYTE[c]]) if c in _GPT2_CHAR_TO_BYTE else _text_bytes(c)
                            for c in text)
        if attr & TokenAttr.BYTE:
            return bytes([int(text[3:5], 16)])
        return b""  # unused and undefined tokens render as nothing

    def is_special(self, token_id: int) -> bool:
        """Whether the token is a control (or unknown) token, which skip_special leaves out."""
        return bool(self.attrs[token_id] & _PARSED_SPECIAL)

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        """The text of `ids`; skip_special leaves out control tokens such as <bos>."""
        detokenizer = self.detokenizer(skip_special)
        for token in ids:
            detokenizer.add(token)
        detokenizer.finalize()
        return detokenizer.text

    def detokenizer(self, skip_special: bool = False) -> StreamingDetokenizer:
        """A StreamingDetokenizer for generated tokens."""
        return StreamingDetokenizer(self, skip_special)

    # -- chat templates -------------------------------------------------------------------------------------
    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tools: list | None = None, **kwargs) -> str:
        """Render the model's chat template the way Hugging Face's apply_chat_template does."""
        import jinja2

        if self.chat_template is None:
            raise TokenizerError(f"{self.source}: the model has no chat template (tokenizer.chat_template is "
                                 "missing), so it is probably a base model; use `edgelm generate` for plain "
                                 "text completion")
        if self._template is None:
            self._template = _compile_template(self.chat_template, self.source)
        special_tokens = {name: self.tokens[token] for name, token in (("bos_token", self.bos_id),
                                                                      ("eos_token", self.eos_id))
                          if token is not None}
        try:
            return self._template.render(messages=messages, tools=tools, add_generation_prompt=add_generation_prompt,
                                         **special_tokens, **kwargs)
        except jinja2.TemplateError as error:
            raise TokenizerError(f"{self.source}: the chat template failed to render: {error}") from None


class _MetadataReader:
    """Typed access to tokenizer metadata; every problem is a TokenizerError naming the key."""

    def __init__(self, metadata: dict, source: str):
        self.metadata = metadata
        self.source = source

    def require(self, key: str, kind: type) -> Any:
        if key not in self.metadata:
            raise TokenizerError(f"{self.source}: tokenizer metadata key '{key}' is missing; re-convert the "
                                 "model with a current llama.cpp converter (convert_hf_to_gguf.py)")
        value = self.metadata[key]
        if not isinstance(value, kind):
            raise TokenizerError(f"{self.source}: tokenizer metadata key '{key}' holds a {type(value).__name__}, "
                                 f"expected a {kind.__name__}; the file is malformed, re-convert it")
        return value

    def optional_list(self, key: str, n_tokens: int) -> list | None:
        if key not in self.metadata:
            return None
        value = self.require(key, list)
        if len(value) < n_tokens:
            raise TokenizerError(f"{self.source}: '{key}' has {len(value)} entries for {n_tokens} tokens; "
                                 "the file is malformed, re-convert it")
        return value

    def token_id(self, key: str, n_tokens: int, default: int | None = None) -> int | None:
        """A special token id; as llama.cpp, ids outside the vocabulary fall back to the default."""
        if default is not None and default >= n_tokens:
            default = None
        value = self.metadata.get(key)
        return value if isinstance(value, int) and 0 <= value < n_tokens else default


def _end_of_generation_ids(reader: _MetadataReader, vocab: Vocabulary, attrs: array,
                           eos_id: int | None) -> frozenset[int]:
    """llama.cpp's EOG set; the tokens it finds by their text become CONTROL tokens (attrs is updated)."""
    n_tokens = len(attrs)
    ids = {eos_id, reader.token_id("tokenizer.ggml.eot_token_id", n_tokens),
           reader.token_id("tokenizer.ggml.eom_token_id", n_tokens)}
    for key, texts in _FIM_TEXTS.items():
        fim_id = reader.token_id(key, n_tokens)
        if fim_id is None:
            fim_id = next((i for i in map(vocab.get, texts) if i is not None), None)
            if fim_id is not None:
                attrs[fim_id] |= TokenAttr.CONTROL
        if key in _FIM_KEYS_ENDING_GENERATION:
            ids.add(fim_id)
    for token in map(vocab.get, sorted(_EOG_TEXTS)):
        if token is not None:
            ids.add(token)
            attrs[token] |= TokenAttr.CONTROL
    ids.discard(None)
    return frozenset(ids)


def _compile_template(source_text: str, source: str):
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str):
        raise jinja2.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # HF's version: unlike jinja's own, it does not escape HTML characters.
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source_text)
    except jinja2.TemplateSyntaxError as error:
        raise TokenizerError(f"{source}: the chat template does not parse: {error}") from None


class StreamingDetokenizer:
    """Turns tokens into text one at a time without ever splitting a UTF-8 character.

    Bytes of an incomplete character are held back until it completes; invalid bytes become U+FFFD.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = False):
        self.tokenizer = tokenizer
        self.skip_special = skip_special
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._parts: list[str] = []
        # llama.cpp drops the space SentencePiece adds in front of the text from the first token's piece.
        self._strip_space = tokenizer.add_space_prefix

    def add(self, token_id: int) -> str:
        """The text that became complete with this token ('' while a character is incomplete)."""
        strip_space, self._strip_space = self._strip_space, False
        if self.skip_special and self.tokenizer.is_special(token_id):
            return ""
        piece = self.tokenizer.token_bytes(token_id)
        if strip_space and piece.startswith(b" "):
            piece = piece[1:]
        return self._emit(self._decoder.decode(piece))

    def finalize(self) -> str:
        """The rest of the text: held-back bytes of an unfinished character, as U+FFFD."""
        return self._emit(self._decoder.decode(b"", final=True))

    def _emit(self, new_text: str) -> str:
        if new_text:
            self._parts.append(new_text)
        return new_text

    @property
    def text(self) -> str:
        """All text so far."""
        if len(self._parts) > 1:
            self._parts = ["".join(self._parts)]
        return self._parts[0] if self._parts else ""
