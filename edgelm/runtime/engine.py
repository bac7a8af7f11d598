"""Generation on edgelm's kernels alone: a packed model directory, memory-mapped, run without PyTorch.

PyTorch is the library's compute substrate (compression, evaluation, eager layers), but importing it costs
about a second and ~220 MB of resident memory before a weight is read: more than all of gemma-3-270m at
5.5 bits. A model directory whose every matrix is in the kernels' plane layout needs none of it. The blocks
run in `ek_decode_layers`, the compiled step the PyTorch models use too (kernels/blocks.py), the embedding
rows and the output matrix on the same kernels, and what is left (final norm, greedy choice) is numpy.
Decoded logits are bit-identical to the PyTorch model's compiled step; a prompt is prefilled through the
same step in chunks (int8 activations throughout, where the PyTorch model prefills with bfloat16 matmuls).

    engine = KernelEngine.load("DIR", context=1024, kv_bits=16)
    logits = engine.prefill(prompt_ids)          # numpy float32 [vocab], after the last prompt token
    logits = engine.decode(token)                # after `token`, at the next position

`edgelm.generate`/`stream_generate` accept an engine in place of a PyTorch model (`load_engine` gives
the pair with its tokenizer), and `edgelm generate`/`chat` use it for such directories.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from edgelm import kernels
from edgelm.errors import GenerationError, ModelFormatError
from edgelm.kernels.blocks import NORMS, PROJECTIONS, LayerStack, rms_norm
from edgelm.models.args import ModelArgs, embed_scale
from edgelm.runtime import KV_GROUP, check_kv_bits

# Tokens per call of the step while prefilling: 128 is as fast as 256 here and needs half the scratch.
PREFILL_CHUNK = 128


def unsupported_reason(path: str | os.PathLike[str]) -> str | None:
    """Why this model cannot run on the kernels alone (None when it can): it must be a model directory whose
    every matrix is packed in the kernels' plane layout and format, on kernels built for this machine."""
    from edgelm.io.artifact import is_artifact, read_config

    path = Path(path)
    if not path.is_dir() or not is_artifact(path):
        return "not an edgelm model directory"
    return _unsupported(read_config(path))


def _unsupported(config: dict[str, Any]) -> str | None:
    if not kernels.available():
        return "edgelm's compiled kernels are not built on this machine"
    args = ModelArgs(**config["model_args"])
    specs = config["quantized_modules"]
    wanted = {f"layers.{i}.{owner}.{name}": "linear" for i in range(args.n_layers) for owner, name in PROJECTIONS}
    wanted["tok_embeddings"] = "embedding"
    if not args.tie_embeddings:
        wanted["output"] = "linear"
    for name, spec in specs.items():
        if name not in wanted:
            return f"{name} is a {spec['kind']} module the kernels-only runtime does not run"
    for name, kind in wanted.items():
        spec = specs.get(name)
        if spec is None or spec["kind"] != kind:
            return f"{name} is not a packed {kind}"
        for fmt in spec.get("tiers", [spec]):
            if fmt.get("kind") == "lowrank":
                return f"{name} has a low-rank row tier, which the kernels-only runtime does not run"
            if fmt.get("layout") == "chunk-planes":
                return (f"{name} is stored in format version 2's layout; re-create the directory to run it "
                        "without PyTorch")
            if fmt.get("layout") != "planes" or not kernels.supports(
                    fmt["bits"], fmt["group_size"], spec["in_features"], fmt.get("zero_dtype", "uint8")):
                return f"{name} is not in a kernel format of the plane layout"
    return None


class _Packed:
    """One packed matrix of the directory (or the row tiers of one) on the kernels, over the file's pages."""

    def __init__(self, weights: dict[str, np.ndarray], name: str, spec: dict[str, Any]):
        self.rows, self.cols = spec["out_features"], spec["in_features"]
        self.tier = weights.get(f"{name}.weight_q.tier")
        self.nbytes = 0 if self.tier is None else self.tier.nbytes  # as stored (edgelm.io.artifact.model_size)
        if "tiers" in spec:
            self.parts = [self._part(weights, f"{name}.weight_q.parts.{k}", fmt, fmt["rows"])
                          for k, fmt in enumerate(spec["tiers"])]
            self.local, rows = kernels.tier_index(self.tier, len(self.parts))
            self.matrix = kernels.KernelParts(self.parts, rows)
        else:
            self.parts = [self._part(weights, f"{name}.weight_q", spec, self.rows)]
            self.matrix = self.parts[0]

    def _part(self, weights, prefix: str, fmt: dict[str, Any], rows: int) -> kernels.KernelMatrix:
        planes, scales, zeros = (weights[f"{prefix}.{part}"] for part in ("packed", "scales", "zeros"))
        if scales.dtype != np.float16 or planes.shape[0] != rows:
            raise ModelFormatError(f"{prefix}: stored tensors do not match config.json; re-create the directory")
        self.nbytes += planes.nbytes + scales.nbytes + (0 if fmt["symmetric"] else zeros.nbytes)
        return kernels.KernelMatrix(planes, scales, zeros, fmt["bits"], fmt["group_size"] or self.cols, self.cols)

    def row_into(self, row: int, out: np.ndarray) -> None:
        """Row `row` dequantized into out [1, cols] (float32), on the calling thread."""
        part, local = (0, row) if self.tier is None else (int(self.tier[row]), int(self.local[row]))
        self.parts[part].dequantize(local, 1, out=out, parallel=False)

    def matvec(self, x: np.ndarray) -> np.ndarray:
        """x [T, cols] float32 -> [T, rows]: activations quantized once, every tier in one parallel job."""
        return self.matrix.matvec(x)


class KernelEngine:
    """A packed model directory on edgelm's kernels; see the module docstring. Like the PyTorch models it
    decodes within static KV caches set up per generation (`setup_caches`, `set_kv_bits`)."""

    def __init__(self, path: Path, threads: int | None):
        from edgelm.io.artifact import is_artifact, map_weights, read_config

        config = read_config(path) if path.is_dir() and is_artifact(path) else None
        reason = "not an edgelm model directory" if config is None else _unsupported(config)
        if reason:
            raise ModelFormatError(f"{path}: cannot run on the kernels alone ({reason}); load it with "
                                   "edgelm.load instead")
        self.config, self.path = config, path
        self.args = args = ModelArgs(**config["model_args"])
        if threads:
            kernels.set_threads(threads)
        weights = map_weights(path)
        specs = config["quantized_modules"]
        self.embedding = _Packed(weights, "tok_embeddings", specs["tok_embeddings"])
        self.output = self.embedding if args.tie_embeddings else _Packed(weights, "output", specs["output"])
        self.embed_scale = embed_scale(args)
        self.softcap = args.extra.get("final_logit_softcapping")
        self.final_norm = weights["norm.weight"]
        self.embedding_bytes = self.embedding.nbytes
        self._blocks = []  # per block: (projection structs, norm weights, biases); _matrices keeps their buffers
        self._matrices = []
        norm_names = {"q_norm": "attn.q_norm", "k_norm": "attn.k_norm"}
        for i in range(args.n_layers):
            prefix = f"layers.{i}."
            matrices = {}
            for owner, name in PROJECTIONS:
                key = f"{prefix}{owner}.{name}"
                packed = _Packed(weights, key, specs[key])
                self._matrices.append(packed)
                matrices[name] = packed.matrix._struct
            norms = {name: weights.get(f"{prefix}{norm_names.get(name, name)}.weight") for name in NORMS}
            biases = {name: weights.get(f"{prefix}attn.{name}.bias") for name in ("wq", "wk", "wv")}
            self._blocks.append((matrices, norms, biases))
        dense = sum(a.nbytes for name, a in weights.items() if ".weight_q." not in name)  # norms, biases
        packed = [self.embedding, *self._matrices] + ([] if args.tie_embeddings else [self.output])
        self.weight_bytes = dense + sum(p.nbytes for p in packed)  # weights as stored, embedding included
        self.kv_bits, self.stack, self.pos = 16, None, 0

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, context: int | None = None, kv_bits: int = 16,
             threads: int | None = None) -> KernelEngine:
        """The directory's model; with `context`, its KV cache for that many positions is set up too
        (float32/float16, or 8-/4-bit: `kv_bits`)."""
        engine = cls(Path(path), threads)
        engine.set_kv_bits(kv_bits)
        if context is not None:
            engine.setup_caches(context)
        return engine

    def set_kv_bits(self, bits: int | None) -> None:
        """The KV cache from the next setup_caches on: 32 (or None) float32, 16 float16, 8 or 4 quantized."""
        check_kv_bits(bits)
        self.kv_bits = 32 if bits is None else bits

    def setup_caches(self, max_len: int) -> None:
        """Static KV caches for `max_len` positions (zero pages until written: memory grows with use)."""
        self.args.check_context(max_len)
        stack = LayerStack(self.args, max_len)
        for i, block in enumerate(self._blocks):
            stack.set_layer(i, *block)
            self._setup_cache(stack, i)
        self.stack, self.pos = stack, 0

    def clear_caches(self) -> None:
        self.stack, self.pos = None, 0

    @property
    def cache_len(self) -> int:
        return 0 if self.stack is None else self.stack.max_len

    def _setup_cache(self, stack: LayerStack, i: int) -> None:
        args, bits = self.args, self.kv_bits
        shape = (args.n_kv_heads, stack.max_len, args.head_dim)
        if bits in (32, 16):
            dtype = np.float32 if bits == 32 else np.float16
            stack.set_float_cache(i, np.zeros(shape, dtype), np.zeros(shape, dtype))
            return
        group = min(KV_GROUP, args.head_dim)
        n_groups = args.head_dim // group
        k, v = ((np.zeros((*shape[:2], args.head_dim * bits // 8), np.uint8),
                 np.zeros((*shape[:2], n_groups), np.float16), np.zeros((*shape[:2], n_groups), np.uint8))
                for _ in range(2))
        stack.set_quantized_cache(i, bits, group, k, v)

    @property
    def vocab_size(self) -> int:
        return self.args.vocab_size

    def _embed(self, tokens: list[int]) -> np.ndarray:
        x = np.empty((len(tokens), self.args.dim), dtype=np.float32)
        for i, token in enumerate(tokens):
            if not 0 <= token < self.args.vocab_size:
                raise GenerationError(f"token id {token} is outside the vocabulary of {self.args.vocab_size} tokens")
            self.embedding.row_into(token, x[i:i + 1])
        if self.embed_scale is not None:
            x *= np.float32(self.embed_scale)
        return x

    def _logits(self, normed: np.ndarray) -> np.ndarray:
        """Logits of final-normed hidden states."""
        out = self.output.matvec(normed)
        if self.softcap:
            out = np.tanh(out / self.softcap) * self.softcap
        return out

    def _check_room(self, n_tokens: int, pos: int) -> None:
        if self.stack is None:
            raise GenerationError("no KV cache: call setup_caches(max_len) first (or load with context=N)")
        if pos < 0 or pos + n_tokens > self.cache_len:
            raise GenerationError(f"positions {pos}..{pos + n_tokens - 1} do not fit the KV cache of "
                                  f"{self.cache_len} tokens; set up a larger cache")

    def prefill(self, tokens: list[int], start_pos: int = 0, chunk: int = PREFILL_CHUNK) -> np.ndarray:
        """Run the prompt through the model from `start_pos`; logits [vocab] after its last token."""
        if not tokens:
            raise GenerationError("the prompt is empty: give at least one token (models that add BOS do so)")
        self._check_room(len(tokens), start_pos)
        x = None
        for begin in range(0, len(tokens), chunk):
            x = self._embed(list(tokens[begin:begin + chunk]))
            self.stack.run(x, start_pos + begin)
        self.pos = start_pos + len(tokens)
        return self._logits(rms_norm(x[-1:], self.final_norm, self.args.norm_eps))[0]

    def decode(self, token: int) -> np.ndarray:
        """Logits [vocab] after `token`, which takes the next position."""
        return self.steps([token])[0]

    def steps(self, tokens: list[int], pos: int | None = None) -> np.ndarray:
        """Logits [T, vocab] after each of T tokens from position `pos` (default: the next one); each row is
        bit-identical to decoding the tokens one at a time."""
        return self._logits(self.final_hidden(tokens, pos))

    def final_hidden(self, tokens: list[int], pos: int | None = None) -> np.ndarray:
        """As `steps`, up to the final norm: the hidden states [T, dim] the output matrix turns into logits."""
        pos = self.pos if pos is None else pos
        self._check_room(len(tokens), pos)
        x = self._embed(tokens)
        self.stack.run(x, pos)
        self.pos = pos + len(tokens)
        return rms_norm(x, self.final_norm, self.args.norm_eps)


def load_engine(name_or_path: str | os.PathLike[str], *, pull: bool = True,
                threads: int | None = None) -> tuple[KernelEngine, Any]:
    """(engine, tokenizer) for a registry name or model directory, as edgelm.load gives a PyTorch model."""
    from edgelm.io.artifact import read_tokenizer_metadata
    from edgelm.registry import resolve
    from edgelm.tokenizer import Tokenizer

    path = resolve(str(name_or_path), pull=pull)
    engine = KernelEngine.load(path, threads=threads)
    return engine, Tokenizer.from_metadata(read_tokenizer_metadata(path), source=str(path))
