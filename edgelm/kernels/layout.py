"""The kernels' weight layout: codes of each 64-wide chunk of a row stored as 4-, 2- and 1-bit planes.

A b-bit code is split into planes by the bits of b: 4 -> one nibble plane, 6 -> nibble + crumb planes,
3 -> crumb + bit planes, 8 -> raw bytes. Within a chunk the planes are ordered nibble, crumb, bit:

    nibble plane (32 bytes): byte j = code j | code (j + 32) << 4
    crumb plane  (16 bytes): byte j = codes j, j + 16, j + 32, j + 48 at bits 0, 2, 4, 6
    bit plane     (8 bytes): bit i (little-endian) = code i

and a code is reassembled as nibble | crumb << 4 | bit << 6 (shifts shrink when a plane is absent). This
costs exactly b bits per code, like the dense packing of model directories, but decodes with a few shifts
and masks per 64 codes in SIMD registers. See csrc/kernels.c.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # edgelm.kernels imports CHUNK without PyTorch
    import torch

CHUNK = 64


def planes(bits: int) -> list[int]:
    """Plane widths of a b-bit code, in storage order."""
    if bits == 8:
        return [8]
    return [w for w in (4, 2, 1) if bits & w]


ROW_BLOCK = 8192  # rows converted at a time: bounds the temporaries for a 262k-row output matrix


def to_planes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes [rows, cols] (cols a multiple of 64) -> plane layout [rows, cols * bits / 8]."""
    import torch

    rows, cols = codes.shape
    if cols % CHUNK:
        raise ValueError(f"{cols} columns are not a multiple of {CHUNK}")
    if bits == 8:
        return codes.to(torch.uint8).contiguous()
    out = torch.empty(rows, cols * bits // 8, dtype=torch.uint8)
    for start in range(0, rows, ROW_BLOCK):
        out[start:start + ROW_BLOCK] = _to_planes(codes[start:start + ROW_BLOCK], bits)
    return out


def _to_planes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    import torch

    rows, cols = codes.shape
    chunks = codes.to(torch.int32).reshape(rows, cols // CHUNK, CHUNK)
    parts, shift = [], 0
    for width in planes(bits):
        plane = (chunks >> shift) & ((1 << width) - 1)
        if width == 4:
            part = plane[..., :32] | (plane[..., 32:] << 4)
        elif width == 2:
            part = plane[..., :16] | (plane[..., 16:32] << 2) | (plane[..., 32:48] << 4) | (plane[..., 48:] << 6)
        else:
            weights = 1 << torch.arange(8, dtype=torch.int32)
            part = (plane.reshape(rows, -1, 8, 8) * weights).sum(-1)
        parts.append(part.to(torch.uint8))
        shift += width
    return torch.cat(parts, dim=-1).reshape(rows, cols * bits // 8).contiguous()


def from_planes(data: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """Inverse of to_planes (for tests and the generic path's reference)."""
    import torch

    rows = data.shape[0]
    if bits == 8:
        return data[:, :cols].clone()
    chunks = data.reshape(rows, cols // CHUNK, CHUNK * bits // 8).to(torch.int32)
    codes = torch.zeros(rows, cols // CHUNK, CHUNK, dtype=torch.int32)
    offset, shift = 0, 0
    for width in planes(bits):
        nbytes = CHUNK * width // 8
        part = chunks[..., offset:offset + nbytes]
        if width == 4:
            plane = torch.cat((part & 15, part >> 4), dim=-1)
        elif width == 2:
            plane = torch.cat([(part >> (2 * k)) & 3 for k in range(4)], dim=-1)
        else:
            plane = ((part[..., :, None] >> torch.arange(8, dtype=torch.int32)) & 1).reshape(rows, -1, CHUNK)
        codes |= plane << shift
        offset += nbytes
        shift += width
    return codes.reshape(rows, cols).to(torch.uint8)
