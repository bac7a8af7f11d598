"""Group-wise affine quantization math, independent of any model or algorithm.

A weight matrix W [out, in] is cut into groups of `group_size` consecutive input columns per row (or one
group per row when group_size is None). Each group has a scale s and an integer zero point z:
    code = clamp(round(w / s) + z, 0, 2^bits - 1),    w_hat = (code - z) * s
Symmetric schemes fix z at 2^(bits-1) (the middle code) and size s from the absolute maximum.
Fitted schemes (`fit=True`) let z be fractional (stored as fp16) and choose s and z per group to minimise
the group's squared error; min/max grids put a level on 0 and on both extremes, which wastes most of a
1- or 2-bit grid (relative error on gemma-3-270m's embedding rows: 1 bit 0.90 -> 0.38, 2 bits 0.25 -> 0.13,
3 bits 0.050 -> 0.036).
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
    fit: bool = False  # least-squares scale and fractional (fp16) zero point per group

    def __post_init__(self) -> None:
        if not 1 <= self.bits <= 8:
            raise ValueError(f"bits must be between 1 and 8, got {self.bits}")
        if self.group_size is not None and self.group_size <= 0:
            raise ValueError(f"group_size must be positive or None, got {self.group_size}")
        if self.fit and self.symmetric:
            raise ValueError("a fitted grid has its own zero point: it cannot also be symmetric")

    @property
    def zero_dtype(self) -> torch.dtype:
        """How the zero points are stored: integers, or fp16 for fitted grids."""
        return torch.float16 if self.fit else torch.uint8

    @property
    def qmax(self) -> int:
        return (1 << self.bits) - 1

    def n_groups(self, in_features: int) -> int:
        gs = self.group_size or in_features
        if in_features % gs:
            raise ValueError(f"{in_features} input features are not a multiple of group size {gs}")
        return in_features // gs

    def bits_per_weight(self, in_features: int, scale_bits: int = 16) -> float:
        """Storage cost per weight: the code plus the group's fp16 scale and (unless symmetric) zero point."""
        per_group = scale_bits + (0 if self.symmetric else 16 if self.fit else 8)
        return self.bits + per_group / (self.group_size or in_features)


@dataclass(frozen=True)
class LowRankFormat:
    """Rows stored as `rank` quantized coefficients over a shared basis: W[rows] ~ C B, C [n, rank] on a
    `bits`-bit fitted grid (one scale and zero point per row), B [rank, in] float16 (modules.LowRankRows).
    For the rarest rows of a token embedding, which only need their few principal directions."""

    rank: int
    bits: int = 4

    def __post_init__(self) -> None:
        if not 1 <= self.rank <= 512 or self.rank % 8:
            raise ValueError(f"rank must be a multiple of 8 between 8 and 512, got {self.rank}")
        if not 2 <= self.bits <= 8:
            raise ValueError(f"coefficient bits must be between 2 and 8, got {self.bits}")

    def nbytes(self, rows: int, in_features: int) -> int:
        """Stored bytes: packed coefficients, a fp16 scale and zero point per row, the fp16 basis."""
        return rows * (self.rank * self.bits // 8 + 4) + 2 * self.rank * in_features


def grouped(w: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """[out, in] -> [out, n_groups, group_size] view."""
    out, inp = w.shape
    gs = group_size or inp
    return w.reshape(out, inp // gs, gs)


def compute_params(w: torch.Tensor, scheme: QuantScheme,
                   clip: torch.Tensor | float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Scales and zero points [out, n_groups] for W [out, in]; `clip` shrinks the range (AWQ/GPTQ search)."""
    if scheme.fit:
        return fitted_params(w, scheme, clip)
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


# Shrink factors of the min/max range that the least-squares fit starts from (it finds a local optimum).
FIT_STARTS = (1.0, 0.75)
FIT_ITERATIONS = 5


def fitted_params(w: torch.Tensor, scheme: QuantScheme,
                  clip: torch.Tensor | float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per group, the s and fractional z minimising sum (w - (q - z) s)^2: alternate the codes q for given
    (s, z) and the least-squares line w ~ s q + b for given codes (z = -b / s), from a few starting ranges;
    the best fit wins. Returned as the fp16 values a PackedWeight stores, so callers see the stored grid."""
    g = grouped(w.float(), scheme.group_size)
    clips = torch.as_tensor(clip, dtype=torch.float32).expand(g.shape[:2]).unsqueeze(-1)
    scales, zeros = [], []
    for rows, clip_rows in zip(g.split(_ROW_CHUNK), clips.split(_ROW_CHUNK)):
        best = None
        mean = rows.mean(-1, keepdim=True)
        for shrink in FIT_STARTS:
            lo = mean + (rows.amin(-1, keepdim=True) - mean) * shrink * clip_rows
            hi = mean + (rows.amax(-1, keepdim=True) - mean) * shrink * clip_rows
            s = ((hi - lo) / scheme.qmax).clamp_min(_MIN_SCALE)
            b = lo
            for _ in range(FIT_ITERATIONS):
                q = torch.round((rows - b) / s).clamp_(0, scheme.qmax)
                q_mean = q.mean(-1, keepdim=True)
                var = (q * q).mean(-1, keepdim=True) - q_mean * q_mean
                cov = (q * rows).mean(-1, keepdim=True) - q_mean * mean
                s = torch.where(var > 1e-12, cov / var.clamp_min(1e-12), s).clamp_min(_MIN_SCALE)
                b = mean - s * q_mean
            s = s.half().float()
            z = (-b / s).half().float()
            q = torch.round(rows / s + z).clamp_(0, scheme.qmax)
            err = (rows - (q - z) * s).pow(2).sum(-1)
            s, z = s[..., 0], z[..., 0]
            if best is None:
                best = (err, s, z)
            else:
                better = err < best[0]
                best = (torch.where(better, err, best[0]), torch.where(better, s, best[1]),
                        torch.where(better, z, best[2]))
        scales.append(best[1])
        zeros.append(best[2])
    return torch.cat(scales), torch.cat(zeros)


_MIN_SCALE = 2.0 ** -20  # an fp16 subnormal: a scale must survive being stored


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """Integer codes (uint8) [out, in] of W under the given group parameters."""
    g = grouped(w.float(), scheme.group_size)
    codes = nearest_codes(g, scale[..., None], zero[..., None], scheme)
    return codes.clamp_(0, scheme.qmax).to(torch.uint8).reshape(w.shape)


def nearest_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """Unclamped float codes of the grid levels nearest to w. Integer zero points are added after rounding,
    as they always were (rounding ties then go the same way as before fractional zero points existed)."""
    return torch.round(w / scale + zero) if scheme.fit else torch.round(w / scale) + zero


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
    """Pack uint8 codes of `bits` bits densely into bytes, row by row: [out, in] -> [out, ceil(in*bits/8)].

    Little-endian bit stream: bit j of code i lands at stream position i * bits + j. Eight codes fill
    exactly `bits` bytes, so they are combined into one integer word and split into bytes (fast, and
    processed in row chunks to bound the working memory).
    """
    out, inp = codes.shape
    row_bytes = -(-inp * bits // 8)
    if bits == 8:
        return codes.to(torch.uint8).contiguous()
    padded = torch.nn.functional.pad(codes, (0, (-inp) % 8)) if inp % 8 else codes
    word_dtype = torch.int32 if bits <= 3 else torch.int64  # 8 codes x bits must fit the word (signed)
    shifts = (torch.arange(8, dtype=word_dtype) * bits)
    byte_shifts = torch.arange(bits, dtype=word_dtype) * 8
    result = torch.empty(out, padded.shape[1] // 8 * bits, dtype=torch.uint8)
    for rows in range(0, out, _ROW_CHUNK):
        chunk = padded[rows:rows + _ROW_CHUNK].to(word_dtype).reshape(-1, padded.shape[1] // 8, 8)
        words = (chunk << shifts).sum(-1)
        result[rows:rows + _ROW_CHUNK] = ((words[..., None] >> byte_shifts) & 0xFF).to(torch.uint8).flatten(1)
    return result[:, :row_bytes].contiguous()


def unpack(packed: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """Inverse of pack: [out, n_bytes] -> uint8 codes [out, in_features]."""
    out = packed.shape[0]
    if bits == 8:
        return packed[:, :in_features]
    if bits in (1, 2, 4):  # whole codes per byte: shifts on the bytes themselves
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8)
        return ((packed[..., None] >> shifts) & ((1 << bits) - 1)).flatten(1)[:, :in_features]
    n_words = -(-in_features // 8)
    full = n_words * bits
    if packed.shape[1] < full:
        packed = torch.nn.functional.pad(packed, (0, full - packed.shape[1]))
    word_dtype = torch.int32 if bits <= 3 else torch.int64
    byte_shifts = torch.arange(bits, dtype=word_dtype) * 8
    shifts = torch.arange(8, dtype=word_dtype) * bits
    mask = (1 << bits) - 1
    result = torch.empty(out, n_words * 8, dtype=torch.uint8)
    for rows in range(0, out, _ROW_CHUNK):
        chunk = packed[rows:rows + _ROW_CHUNK].to(word_dtype).reshape(-1, n_words, bits)
        words = (chunk << byte_shifts).sum(-1)
        result[rows:rows + _ROW_CHUNK] = ((words[..., None] >> shifts) & mask).to(torch.uint8).flatten(1)
    return result[:, :in_features]


_ROW_CHUNK = 16384


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: how close approx is to reference."""
    reference, approx = reference.detach().float(), approx.detach().float()
    noise = (reference - approx).pow(2).sum()
    return float(10 * torch.log10(reference.pow(2).sum() / noise.clamp_min(1e-30)))
