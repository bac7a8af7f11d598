"""Tiny random-weight GGUF models, one per architecture, written by the tests themselves.

They have the real tensor names, metadata keys and tokenizer layout of their architecture, a few layers
and a tiny vocabulary, so loading, caching and decoding are exercised in milliseconds — and llama.cpp can
load the very same files, which makes it an independent reference for the forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from edgelm.io.gguf_export import write_metadata
from tests.tiny_vocab import tiny_bpe_metadata, tiny_spm_metadata


@dataclass
class TinyConfig:
    arch: str  # "gemma3", "qwen2" or "llama"
    dim: int = 64
    n_layers: int = 3
    n_heads: int = 4
    n_kv_heads: int = 2
    head_dim: int | None = None  # default: 32 for gemma3 (!= dim / n_heads, as in Gemma), else dim / n_heads
    hidden_dim: int = 128
    context: int = 256
    sliding_window: int = 8
    tied: bool = True
    weight_type: str = "F32"  # storage type of the 2-D weights: F32, F16, BF16, Q8_0, Q4_0, Q5_0, ...
    seed: int = 0


def write_tiny_model(path: Path, config: TinyConfig, extra_metadata: dict[str, Any] | None = None,
                     drop_keys: tuple[str, ...] = ()) -> Path:
    """Write the model; `extra_metadata` adds or overrides keys, `drop_keys` leaves keys out (damaged files)."""
    import gguf

    rng = np.random.default_rng(config.seed)
    vocab = tiny_spm_metadata() if config.arch == "gemma3" else tiny_bpe_metadata()
    n_vocab = len(vocab["tokenizer.ggml.tokens"])
    c = config
    if c.head_dim is None:
        c = replace(c, head_dim=32 if c.arch == "gemma3" else c.dim // c.n_heads)
    writer = gguf.GGUFWriter(str(path), (extra_metadata or {}).get("general.architecture", c.arch))
    hparams: dict[str, Any] = {
        "context_length": c.context, "embedding_length": c.dim, "block_count": c.n_layers,
        "feed_forward_length": c.hidden_dim, "attention.head_count": c.n_heads,
        "attention.head_count_kv": c.n_kv_heads, "attention.key_length": c.head_dim,
        "attention.value_length": c.head_dim, "attention.layer_norm_rms_epsilon": 1e-6,
        "rope.freq_base": 10000.0 if c.arch == "llama" else 1_000_000.0,
    }
    if c.arch == "gemma3":
        hparams["attention.sliding_window"] = c.sliding_window
    for key, value in hparams.items():
        if f"{c.arch}.{key}" not in drop_keys:
            write_metadata(writer, f"{c.arch}.{key}", value)
    for key, value in {**vocab, **(extra_metadata or {})}.items():
        if key not in drop_keys:
            write_metadata(writer, key, value)

    def weight(name: str, rows: int, cols: int, scale: float) -> None:
        _add_tensor(writer, name, rng.normal(0, scale, (rows, cols)).astype(np.float32), c.weight_type)

    def norm(name: str, size: int) -> None:
        writer.add_tensor(name, (1.0 + rng.normal(0, 0.1, size)).astype(np.float32))

    weight("token_embd.weight", n_vocab, c.dim, 1.0 if c.arch == "gemma3" else 0.1)
    if not c.tied:
        weight("output.weight", n_vocab, c.dim, 0.1)
    norm("output_norm.weight", c.dim)
    q_dim, kv_dim = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    for i in range(c.n_layers):
        b = f"blk.{i}."
        weight(b + "attn_q.weight", q_dim, c.dim, c.dim ** -0.5)
        weight(b + "attn_k.weight", kv_dim, c.dim, c.dim ** -0.5)
        weight(b + "attn_v.weight", kv_dim, c.dim, c.dim ** -0.5)
        weight(b + "attn_output.weight", c.dim, q_dim, q_dim ** -0.5)
        weight(b + "ffn_gate.weight", c.hidden_dim, c.dim, c.dim ** -0.5)
        weight(b + "ffn_up.weight", c.hidden_dim, c.dim, c.dim ** -0.5)
        weight(b + "ffn_down.weight", c.dim, c.hidden_dim, c.hidden_dim ** -0.5)
        norm(b + "attn_norm.weight", c.dim)
        norm(b + "ffn_norm.weight", c.dim)
        if c.arch == "qwen2":
            for proj, size in (("q", q_dim), ("k", kv_dim), ("v", kv_dim)):
                writer.add_tensor(b + f"attn_{proj}.bias", rng.normal(0, 0.1, size).astype(np.float32))
        if c.arch == "gemma3":
            norm(b + "attn_q_norm.weight", c.head_dim)
            norm(b + "attn_k_norm.weight", c.head_dim)
            norm(b + "post_attention_norm.weight", c.dim)
            norm(b + "post_ffw_norm.weight", c.dim)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _add_tensor(writer, name: str, values: np.ndarray, type_name: str) -> None:
    import gguf
    from gguf.quants import quantize

    qtype = gguf.GGMLQuantizationType[type_name]
    if qtype == gguf.GGMLQuantizationType.F32:
        writer.add_tensor(name, values)
    elif qtype == gguf.GGMLQuantizationType.F16:
        writer.add_tensor(name, values.astype(np.float16))
    else:
        writer.add_tensor(name, quantize(values, qtype), raw_dtype=qtype)
