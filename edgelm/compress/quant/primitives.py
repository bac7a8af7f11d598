"""Group-wise affine quantization math, independent of any model or algorithm.

A weight matrix W [out, in] is cut into groups of `group_size` consecutive input columns per row (or one
group per row when group_size is None). Each group has a scale s and an integer zero point z:
    code = clamp(round(w / s) + z, 0, 2^bits - 1),    w_hat = (code - z) * s
Symmetric schemes fix z at 2^(bits-1) (the middle code) and size s from the absolute maximum.
Algorithms (RTN, GPTQ, AWQ, ...) decide *which* scales and codes; this module only does the arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class QuantScheme:
    bits: int
    group_size: int | None = 64  # None: one group per output row
    symmetric: bool = False

    def __post_init__(self) -> None:
        if not 1 <= self.bits <= 8:
            raise ValueError(f"bits must be between 1 and 8, got {self.bits}")
        if self.group_size is not None and self.group_size <= 0:
            raise ValueError(f"group_size must be positive or None, got {self.group_size}")

    @property
    def qmax(self) -> int:
        return (1 << self.bits) - 1

    def n_groups(self, in_features: int) -> int:
        gs = self.group_size or in_features
        if in_features % gs:
            raise ValueError(f"{in_features} input features are not a multiple of group size {gs}")
        return in_features // gs

    def bits_per_weight(self, in_features: int, scale_bits: int = 16) -> float:
        """Storage cost per weight: the code plus the group's fp16 scale and (unless symmetric) uint8 zero."""
        per_group = scale_bits + (0 if self.symmetric else 8)
        return self.bits + per_group / (self.group_size or in_features)


def grouped(w: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """[out, in] -> [out, n_groups, group_size] view."""
    out, inp = w.shape
    gs = group_size or inp
    return w.reshape(out, inp // gs, gs)


def compute_params(w: torch.Tensor, scheme: QuantScheme,
                   clip: torch.Tensor | float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Scales and zero points [out, n_groups] for W [out, in]; `clip` shrinks the range (AWQ/GPTQ search)."""
    g = grouped(w.float(), scheme.group_size)
    if scheme.symmetric:
        half = 1 << (scheme.bits - 1)
        absmax = g.abs().amax(-1) * clip
        # Codes span [-half, half - 1] around the zero point `half`; size s so absmax lands on half - 1
        # (for 1 bit: the single positive level), keeping the grid symmetric enough and never clipping hard.
        scale = absmax / max(half - 1, 1)
        zero = torch.full_like(scale, float(half))
    else:
        lo = torch.clamp(g.amin(-1) * clip, max=0.0)
        hi = torch.clamp(g.amax(-1) * clip, min=0.0)
        scale = (hi - lo) / scheme.qmax
        zero = torch.round(-lo / torch.where(scale > 0, scale, torch.ones_like(scale)))
    scale = torch.where(scale > 0, scale, torch.full_like(scale, 1e-8))
    return scale, zero.clamp(0, scheme.qmax)


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """Integer codes (uint8) [out, in] of W under the given group parameters."""
    g = grouped(w.float(), scheme.group_size)
    codes = torch.round(g / scale[..., None]) + zero[..., None]
    return codes.clamp_(0, scheme.qmax).to(torch.uint8).reshape(w.shape)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
               group_size: int | None) -> torch.Tensor:
    """Float weights [out, in] from codes and group parameters."""
    g = grouped(codes.float(), group_size)
    return ((g - zero[..., None]) * scale[..., None]).reshape(codes.shape)


def fake_quantize(w: torch.Tensor, scheme: QuantScheme, clip: torch.Tensor | float = 1.0) -> torch.Tensor:
    """Quantize and dequantize in one go (round-to-nearest with the given clipping)."""
    scale, zero = compute_params(w, scheme, clip)
    return dequantize(quantize(w, scale, zero, scheme), scale, zero, scheme.group_size).to(w.dtype)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack uint8 codes of `bits` bits densely into bytes, row by row: [out, in] -> [out, ceil(in*bits/8)]."""
    out, inp = codes.shape
    bit_idx = torch.arange(bits, dtype=torch.uint8)
    # Little-endian bit stream: bit j of code i lands at stream position i * bits + j.
    stream = ((codes[..., None] >> bit_idx) & 1).reshape(out, inp * bits)
    pad = (-stream.shape[1]) % 8
    if pad:
        stream = torch.nn.functional.pad(stream, (0, pad))
    weights = (1 << torch.arange(8, dtype=torch.int32)).to(torch.int32)
    return (stream.reshape(out, -1, 8).to(torch.int32) * weights).sum(-1).to(torch.uint8)


def unpack(packed: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """Inverse of pack: [out, n_bytes] -> uint8 codes [out, in_features]."""
    out = packed.shape[0]
    bit_idx = torch.arange(8, dtype=torch.uint8)
    stream = ((packed[..., None] >> bit_idx) & 1).reshape(out, -1)[:, : in_features * bits]
    weights = (1 << torch.arange(bits, dtype=torch.int32)).to(torch.int32)
    return (stream.reshape(out, in_features, bits).to(torch.int32) * weights).sum(-1).to(torch.uint8)


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: how close approx is to reference."""
    reference, approx = reference.detach().float(), approx.detach().float()
    noise = (reference - approx).pow(2).sum()
    return float(10 * torch.log10(reference.pow(2).sum() / noise.clamp_min(1e-30)))
