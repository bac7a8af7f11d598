"""KV-cache quantization: keys and values stored as int8 / int4 codes with per-group scales.

Each cached key/value vector (one token, one head) is cut into groups of `group_size` channels with their
own scale and zero point (asymmetric, as KIVI's per-token scheme). The attention reads the dequantized
cache; the perplexity path (no cache) applies the same quantize-dequantize to K and V, so the perplexity
effect measured there is exactly the runtime's.
"""

from __future__ import annotations

import torch
from torch import nn

from edgelm.compress.quant.primitives import QuantScheme, compute_params, dequantize, pack, quantize, unpack
from edgelm.runtime import KV_GROUP, check_kv_bits


def kv_scheme(bits: int | None, head_dim: int, group_size: int = KV_GROUP) -> QuantScheme | None:
    """The cache's quantization scheme for --kv-bits 8 or 4 (None for a float cache: 32, 16 or None)."""
    check_kv_bits(bits)
    if bits in (None, 32, 16):
        return None
    return QuantScheme(bits, min(group_size, head_dim))


def fake_quantize_kv(t: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """Quantize-dequantize [..., head_dim] vectors group-wise, as the quantized cache stores them."""
    flat = t.reshape(-1, t.shape[-1]).float()
    scale, zero = compute_params(flat, scheme)
    codes = quantize(flat, scale, zero, scheme)
    # The cache keeps fp16 scales: dequantize with the same rounding so both paths agree exactly.
    return dequantize(codes, scale.half().float(), zero, scheme.group_size).reshape(t.shape).to(t.dtype)


class QuantizedKVCache(nn.Module):
    """Same interface as models.base.KVCache; stores packed codes, fp16 scales and uint8 zeros."""

    def __init__(self, batch: int, n_kv_heads: int, max_len: int, head_dim: int, scheme: QuantScheme):
        super().__init__()
        self.scheme, self.head_dim = scheme, head_dim
        n_groups = scheme.n_groups(head_dim)
        code_bytes = head_dim * scheme.bits // 8
        for name in ("k", "v"):
            self.register_buffer(f"{name}_codes", torch.zeros(batch, n_kv_heads, max_len, code_bytes,
                                                              dtype=torch.uint8), persistent=False)
            self.register_buffer(f"{name}_scales", torch.zeros(batch, n_kv_heads, max_len, n_groups,
                                                               dtype=torch.float16), persistent=False)
            self.register_buffer(f"{name}_zeros", torch.zeros(batch, n_kv_heads, max_len, n_groups,
                                                              dtype=torch.uint8), persistent=False)

    @property
    def max_len(self) -> int:
        return self.k_codes.shape[2]

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def _store(self, name: str, input_pos: torch.Tensor, t: torch.Tensor) -> None:
        b, h, n, d = t.shape
        flat = t.reshape(-1, d).float()
        scale, zero = compute_params(flat, self.scheme)
        codes = pack(quantize(flat, scale, zero, self.scheme), self.scheme.bits)
        getattr(self, f"{name}_codes").index_copy_(2, input_pos, codes.reshape(b, h, n, -1))
        getattr(self, f"{name}_scales").index_copy_(2, input_pos, scale.reshape(b, h, n, -1).half())
        getattr(self, f"{name}_zeros").index_copy_(2, input_pos, zero.reshape(b, h, n, -1).to(torch.uint8))

    def _load(self, name: str, kv_len: int, dtype: torch.dtype) -> torch.Tensor:
        codes = getattr(self, f"{name}_codes")[:, :, :kv_len]
        b, h, n, _ = codes.shape
        values = dequantize(unpack(codes.reshape(b * h * n, -1), self.scheme.bits, self.head_dim),
                            getattr(self, f"{name}_scales")[:, :, :kv_len].reshape(b * h * n, -1).float(),
                            getattr(self, f"{name}_zeros")[:, :, :kv_len].reshape(b * h * n, -1).float(),
                            self.scheme.group_size)
        return values.reshape(b, h, n, self.head_dim).to(dtype)

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_len: int):
        self._store("k", input_pos, k)
        self._store("v", input_pos, v)
        return self._load("k", kv_len, k.dtype), self._load("v", kv_len, v.dtype)
