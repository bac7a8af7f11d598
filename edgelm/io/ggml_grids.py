"""The integer grids inside ggml quantized tensors, as (codes, scale, zero) per group of consecutive weights.

Every ggml block type used for weights is an affine grid w = (code - zero) * scale over groups of 32 (16 for
Q6_K) weights of a row. Decoding the blocks into that form lets a model loaded from a quantized GGUF keep
its weights *exactly* as the file holds them, in edgelm's packed format, instead of re-quantizing the
dequantized floats (which would add a second rounding on top of the first). Scales become fp16 as edgelm
stores them; K-quant scales are products of an fp16 and a 6/8-bit integer, so that rounding is the only
(tiny, ~2^-11 relative) difference from the file.

| ggml type | bits | group | zero | edgelm storage bits per weight |
|---|---|---|---|---|
| Q8_0 | 8 | 32 | 128 (symmetric) | 8.5 |
| Q5_0 | 5 | 32 | 16 (symmetric) | 5.5 |
| Q4_0 | 4 | 32 | 8 (symmetric) | 4.5 |
| Q5_1, Q4_1 | 5, 4 | 32 | -min/d (fp16) | 6.0, 5.0 |
| Q4_K | 4 | 32 | dmin·m/(d·sc) (fp16) | 5.0 (the file: 4.5) |
| Q6_K | 6 | 16 | 32 (symmetric) | 7.0 (the file: 6.5625) |
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

QK_K = 256


@dataclass
class Grid:
    codes: np.ndarray  # uint8 [rows, cols]
    scale: np.ndarray  # float32 [rows, cols // group_size]
    zero: np.ndarray  # float32 [rows, cols // group_size]
    bits: int
    group_size: int
    symmetric: bool  # zero is the fixed middle code 2^(bits-1)

    def dequantize(self) -> np.ndarray:
        rows, cols = self.codes.shape
        g = self.codes.reshape(rows, -1, self.group_size).astype(np.float32)
        return ((g - self.zero[..., None]) * self.scale[..., None]).reshape(rows, cols)


def _blocks(raw: np.ndarray, rows: int, block_bytes: int) -> np.ndarray:
    return np.asarray(raw, dtype=np.uint8).reshape(rows, -1, block_bytes)


def _f16(b: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(b).view(np.float16).astype(np.float32)[..., 0]


def _nibbles(qs: np.ndarray, half: int) -> np.ndarray:
    """ggml's nibble layout: byte i holds element i (low) and element i + half (high)."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _q8_0(b: np.ndarray) -> tuple[np.ndarray, ...]:
    d = _f16(b[..., 0:2])
    codes = (b[..., 2:34].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
    return codes, d, np.full_like(d, 128.0), 8, 32, True


def _q4_0(b: np.ndarray) -> tuple[np.ndarray, ...]:
    d = _f16(b[..., 0:2])
    return _nibbles(b[..., 2:18], 16), d, np.full_like(d, 8.0), 4, 32, True


def _q4_1(b: np.ndarray) -> tuple[np.ndarray, ...]:
    d, m = _f16(b[..., 0:2]), _f16(b[..., 2:4])
    return _nibbles(b[..., 4:20], 16), d, _offset_zero(m, d), 4, 32, False


def _high_bits(qh: np.ndarray) -> np.ndarray:
    """Q5_0/Q5_1: the fifth bit of element i is bit i of a little-endian uint32."""
    word = np.ascontiguousarray(qh).view(np.uint32)
    return ((word >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8)


def _q5_0(b: np.ndarray) -> tuple[np.ndarray, ...]:
    d = _f16(b[..., 0:2])
    codes = _nibbles(b[..., 6:22], 16) | (_high_bits(b[..., 2:6]) << 4)
    return codes, d, np.full_like(d, 16.0), 5, 32, True


def _q5_1(b: np.ndarray) -> tuple[np.ndarray, ...]:
    d, m = _f16(b[..., 0:2]), _f16(b[..., 2:4])
    codes = _nibbles(b[..., 8:24], 16) | (_high_bits(b[..., 4:8]) << 4)
    return codes, d, _offset_zero(m, d), 5, 32, False


def _offset_zero(offset: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """w = d·q + m  ==  (q - zero)·d with zero = -m/d."""
    return np.where(scale != 0, -offset / np.where(scale != 0, scale, 1), 0).astype(np.float32)


def _k_scale_min(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 8 six-bit scales and mins of a Q4_K/Q5_K super-block (12 bytes)."""
    s = scales.astype(np.uint8)
    sc = np.concatenate([s[..., 0:4] & 63, (s[..., 8:12] & 0x0F) | ((s[..., 0:4] >> 6) << 4)], axis=-1)
    mn = np.concatenate([s[..., 4:8] & 63, (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)], axis=-1)
    return sc.astype(np.float32), mn.astype(np.float32)


def _q4_k(b: np.ndarray) -> tuple[np.ndarray, ...]:
    d, dmin = _f16(b[..., 0:2]), _f16(b[..., 2:4])
    sc, mn = _k_scale_min(b[..., 4:16])
    qs = b[..., 16:144].reshape(*b.shape[:-1], 4, 32)  # 4 chunks of 64 weights: low nibbles, then high
    codes = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).reshape(*b.shape[:-1], QK_K)
    scale = d[..., None] * sc  # 8 groups of 32
    offset = -dmin[..., None] * mn
    zero = _offset_zero(offset, scale)
    # A zero sub-scale makes the group the constant `offset`: as a grid, code 1 with scale = offset, zero 0.
    flat = sc == 0
    if flat.any():
        codes = codes.reshape(*flat.shape, 32)
        codes[flat] = 1
        codes = codes.reshape(*b.shape[:-1], QK_K)
        scale = np.where(flat, offset, scale)
    return codes, scale, zero, 4, 32, False


def _q6_k(b: np.ndarray) -> tuple[np.ndarray, ...]:
    ql = b[..., 0:128].reshape(*b.shape[:-1], 2, 64)
    qh = b[..., 128:192].reshape(*b.shape[:-1], 2, 32)
    sc = b[..., 192:208].view(np.int8).astype(np.float32)
    d = _f16(b[..., 208:210])
    # Per 128-weight half: ql low nibbles -> 0..63, high nibbles -> 64..127; qh 2-bit fields at shifts 0,2,4,6
    # give the top bits of elements 0..31, 32..63, 64..95, 96..127.
    low = np.concatenate([ql & 0x0F, ql >> 4], axis=-1)  # [..., 2, 128]
    high = np.concatenate([(qh >> s) & 3 for s in (0, 2, 4, 6)], axis=-1)  # [..., 2, 128]
    codes = (low | (high << 4)).reshape(*b.shape[:-1], QK_K)
    scale = d[..., None] * sc  # 16 groups of 16
    return codes, scale, np.full_like(scale, 32.0), 6, 16, True


DECODERS = {  # type -> (bytes per block, weights per block, decoder)
    "Q8_0": (34, 32, _q8_0), "Q4_0": (18, 32, _q4_0), "Q4_1": (20, 32, _q4_1), "Q5_0": (22, 32, _q5_0),
    "Q5_1": (24, 32, _q5_1), "Q4_K": (144, QK_K, _q4_k), "Q6_K": (210, QK_K, _q6_k),
}


def decode_grid(type_name: str, raw: np.ndarray, shape: tuple[int, int]) -> Grid | None:
    """The grid of a 2-D tensor of `type_name` stored as `raw` bytes, or None for types without one here."""
    if type_name not in DECODERS or len(shape) != 2:
        return None
    block_bytes, block_weights, decoder = DECODERS[type_name]
    rows, cols = shape
    if cols % block_weights:
        return None
    codes, scale, zero, bits, group, symmetric = decoder(_blocks(raw, rows, block_bytes))
    return Grid(codes.reshape(rows, cols).astype(np.uint8), scale.reshape(rows, -1).astype(np.float32),
                zero.reshape(rows, -1).astype(np.float32), bits, group, symmetric)
