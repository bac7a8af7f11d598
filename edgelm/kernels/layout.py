"""The kernels' weight layout: codes stored as 4-, 2- and 1-bit planes, 256 codes ("a quad") at a time.

A b-bit code is split into planes by the bits of b: 4 -> one nibble plane, 6 -> nibble + crumb planes,
3 -> crumb + bit planes, 8 -> raw bytes; a code is reassembled as nibble | crumb << 4 | bit << 6 (shifts
shrink when a plane is absent). Every layout here costs exactly b bits per code.

A row is cut into quads of 4 chunks of 64 codes. The SIMD kernels multiply a quad as four "transposed"
vectors of 64 codes: vector k, byte 16 q + 4 j + b holds code 64 j + 16 q + 4 k + b (the four chunks'
dwords transposed 4 x 4 within each 16-byte lane; see csrc/kernels.c). A full quad stores those vectors
v0..v3 directly, planes in the order nibble, crumb, bit (32 * b bytes):

    nibble plane (128 bytes): byte 64 h + i = v[2h][i] | v[2h + 1][i] << 4
    crumb plane   (64 bytes): byte i = v0[i] | v1[i] << 2 | v2[i] << 4 | v3[i] << 6
    bit plane     (32 bytes): bit i of the little-endian uint64 at byte 8 k = v[k][i]
    8 bits       (256 bytes): v0, v1, v2, v3

so that a quad decodes into the four vectors with two loads, a shift and four masks (4 bits). The chunks of
a row's last, partial quad (when the width is not a multiple of 256) are stored chunk by chunk:

    nibble plane (32 bytes): byte j = code j | code (j + 32) << 4
    crumb plane  (16 bytes): byte j = codes j, j + 16, j + 32, j + 48 at bits 0, 2, 4, 6
    bit plane     (8 bytes): bit i (little-endian) = code i

which is also how whole rows were stored by format version 2 (`from_chunk_planes` reads those).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # edgelm.kernels imports CHUNK without PyTorch
    import torch

CHUNK = 64
QUAD = 4 * CHUNK


def planes(bits: int) -> list[int]:
    """Plane widths of a b-bit code, in storage order."""
    if bits == 8:
        return [8]
    return [w for w in (4, 2, 1) if bits & w]


ROW_BLOCK = 8192  # rows converted at a time: bounds the temporaries for a 262k-row output matrix


def _quad_order() -> torch.Tensor:
    """order[64 k + i] = the code (of 256) that byte i of transposed vector k holds."""
    import torch

    i = torch.arange(CHUNK)
    q, j, b = i // 16, (i // 4) % 4, i % 4
    return torch.cat([64 * j + 16 * q + 4 * k + b for k in range(4)])


def to_planes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes [rows, cols] (cols a multiple of 64) -> plane layout [rows, cols * bits / 8]."""
    import torch

    rows, cols = codes.shape
    if cols % CHUNK:
        raise ValueError(f"{cols} columns are not a multiple of {CHUNK}")
    out = torch.empty(rows, cols * bits // 8, dtype=torch.uint8)
    full = cols // QUAD * QUAD  # the full quads' codes; the rest goes chunk by chunk
    for start in range(0, rows, ROW_BLOCK):
        block = codes[start:start + ROW_BLOCK]
        parts = [_quads_to_planes(block[:, :full], bits), to_chunk_planes(block[:, full:], bits)]
        out[start:start + ROW_BLOCK] = torch.cat(parts, dim=-1)
    return out


def from_planes(data: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """Inverse of to_planes."""
    import torch

    full = cols // QUAD * QUAD
    split = full * bits // 8
    return torch.cat([_quads_from_planes(data[:, :split], bits, full),
                      from_chunk_planes(data[:, split:], bits, cols - full)], dim=-1)


def _quads_to_planes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    import torch

    rows, cols = codes.shape
    v = codes.to(torch.int32).reshape(rows, cols // QUAD, QUAD)[..., _quad_order()].reshape(rows, -1, 4, CHUNK)
    if bits == 8:
        return v.reshape(rows, cols).to(torch.uint8)
    parts, shift = [], 0
    for width in planes(bits):
        plane = (v >> shift) & ((1 << width) - 1)
        if width == 4:
            part = torch.cat((plane[..., 0, :] | plane[..., 1, :] << 4, plane[..., 2, :] | plane[..., 3, :] << 4), -1)
        elif width == 2:
            part = plane[..., 0, :] | plane[..., 1, :] << 2 | plane[..., 2, :] << 4 | plane[..., 3, :] << 6
        else:
            part = (plane.reshape(rows, -1, 32, 8) << torch.arange(8, dtype=torch.int32)).sum(-1)
        parts.append(part.to(torch.uint8))
        shift += width
    return torch.cat(parts, dim=-1).reshape(rows, cols * bits // 8)


def _quads_from_planes(data: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    import torch

    rows, n_quads = data.shape[0], cols // QUAD
    quads = data.reshape(rows, n_quads, QUAD * bits // 8).to(torch.int32)
    if bits == 8:
        v = quads
    else:
        v = torch.zeros(rows, n_quads, 4, CHUNK, dtype=torch.int32)
        offset, shift = 0, 0
        for width in planes(bits):
            nbytes = QUAD * width // 8
            part = quads[..., offset:offset + nbytes]
            if width == 4:
                plane = torch.stack((part[..., :64] & 15, part[..., :64] >> 4, part[..., 64:] & 15, part[..., 64:] >> 4), 2)
            elif width == 2:
                plane = torch.stack([(part >> (2 * k)) & 3 for k in range(4)], 2)
            else:
                plane = ((part[..., None] >> torch.arange(8, dtype=torch.int32)) & 1).reshape(rows, n_quads, 4, CHUNK)
            v |= plane << shift
            offset += nbytes
            shift += width
    codes = torch.empty(rows, n_quads, QUAD, dtype=torch.int32)
    codes[..., _quad_order()] = v.reshape(rows, n_quads, QUAD)
    return codes.reshape(rows, cols).to(torch.uint8)


def to_chunk_planes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Rows in the chunk layout: a row's partial last quad, or whole rows as format version 2 stored them."""
    import torch

    rows, cols = codes.shape
    if bits == 8:
        return codes.to(torch.uint8)
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
    return torch.cat(parts, dim=-1).reshape(rows, cols * bits // 8)


def from_chunk_planes(data: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """Codes [rows, cols] from rows in the chunk layout (to_chunk_planes' inverse)."""
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
