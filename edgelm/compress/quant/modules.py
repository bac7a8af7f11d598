"""Quantized layers that replace nn.Linear / nn.Embedding module by module.

Weights are stored as densely packed integer codes plus per-group scales and zero points, exactly the
bytes an artifact holds. The forward pass dequantizes (the runtime issue adds fused low-bit kernels);
`QuantizedEmbedding` serves both the token lookup (only the rows it needs) and, through `.weight`, the
tied output matrix.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from edgelm.compress.quant.primitives import QuantScheme, dequantize, pack, unpack


class PackedWeight(nn.Module):
    """codes [out, in] of `bits` bits packed row-wise, scales (fp16) and zeros [out, n_groups].

    Zero points are uint8 integers, except for weights derived from any-precision models, whose n-bit
    grids have half-integer zero points (float16).
    """

    def __init__(self, out_features: int, in_features: int, scheme: QuantScheme,
                 zero_dtype: torch.dtype = torch.uint8):
        super().__init__()
        self.out_features, self.in_features, self.scheme = out_features, in_features, scheme
        n_groups = scheme.n_groups(in_features)
        row_bytes = -(-in_features * scheme.bits // 8)
        self.register_buffer("packed", torch.zeros(out_features, row_bytes, dtype=torch.uint8))
        self.register_buffer("scales", torch.zeros(out_features, n_groups, dtype=torch.float16))
        self.register_buffer("zeros", torch.zeros(out_features, n_groups, dtype=zero_dtype))
        self.scale_gain: torch.Tensor | None = None  # trainable multiplier on the scales (distillation)

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, scheme: QuantScheme,
                   zero_dtype: torch.dtype = torch.uint8) -> PackedWeight:
        out, inp = codes.shape
        weight = cls(out, inp, scheme, zero_dtype)
        weight.packed.copy_(pack(codes, scheme.bits))
        weight.scales.copy_(scale.to(torch.float16))
        weight.zeros.copy_(zero.to(zero_dtype))
        return weight

    def codes(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        packed = self.packed if rows is None else self.packed[rows]
        return unpack(packed, self.scheme.bits, self.in_features)

    def dequantize(self, rows: torch.Tensor | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        scales = (self.scales if rows is None else self.scales[rows]).float()
        if self.scale_gain is not None:
            scales = scales * (self.scale_gain if rows is None else self.scale_gain[rows])
        zeros = self.zeros if rows is None else self.zeros[rows]
        return dequantize(self.codes(rows), scales, zeros.float(), self.scheme.group_size).to(dtype)

    @property
    def storage_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in (self.packed, self.scales, self.zeros)
                   if b is not self.zeros or not self.scheme.symmetric)

    def extra_repr(self) -> str:
        s = self.scheme
        return (f"{self.out_features}x{self.in_features}, bits={s.bits}, group_size={s.group_size}, "
                f"symmetric={s.symmetric}")


class QuantizedLinear(nn.Module):
    def __init__(self, weight: PackedWeight, bias: torch.Tensor | None = None):
        super().__init__()
        self.weight_q = weight
        self.in_features, self.out_features = weight.in_features, weight.out_features
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight, for code that inspects layers (not a stored tensor)."""
        return self.weight_q.dequantize()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight_q.dequantize(dtype=x.dtype), self.bias)


class QuantizedEmbedding(nn.Module):
    def __init__(self, weight: PackedWeight):
        super().__init__()
        self.weight_q = weight
        self.num_embeddings, self.embedding_dim = weight.out_features, weight.in_features

    @property
    def weight(self) -> torch.Tensor:
        return self.weight_q.dequantize()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        return self.weight_q.dequantize(rows=flat).reshape(*ids.shape, self.embedding_dim)
