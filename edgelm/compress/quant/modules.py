"""Quantized layers that replace nn.Linear / nn.Embedding module by module.

Weights are stored as densely packed integer codes plus per-group scales and zero points, exactly the
bytes an artifact holds. `matmul` runs a few tokens (decoding) on edgelm's compiled kernels when they are
built (fused dequantize-and-dot, no float copy of the weight) and larger batches by dequantizing a block
of rows at a time (in C when the kernels are built) for a float32 or bfloat16 matmul; training (gradients
through trainable scales) always takes PyTorch's dequantizing path. `QuantizedEmbedding` serves both
the token lookup (only the rows it needs) and, through `project`, the tied output matrix.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
import torch.nn.functional as F
from torch import nn

from edgelm import kernels
from edgelm.compress.quant.primitives import (
    LowRankFormat,
    QuantScheme,
    compute_params,
    dequantize,
    pack,
    quantize,
    unpack,
)
from edgelm.kernels.layout import (
    CHUNK,
    ROW_BLOCK,
    from_chunk_planes,
    from_planes,
    to_planes,
)

# Up to this many tokens per call the fused kernels beat dequantize-then-matmul (which writes and reads a
# float copy of the weight); prefill chunks take the batched path.
KERNEL_MAX_TOKENS = 8


def kernel_eligible(weight: nn.Module, x: torch.Tensor) -> bool:
    return x.shape[0] <= KERNEL_MAX_TOKENS and batched_eligible(weight, x)


# Embedding lookups of up to this many rows go row by row (decoding, speculative verification).
LOOKUP_MAX_ROWS = 16


def kernels_usable(weight: nn.Module) -> bool:
    """The compiled kernels may compute with this weight now (built, no gradients, no trainable scales)."""
    return weight.scale_gain is None and not torch.is_grad_enabled() and kernels.available()


def batched_eligible(weight: nn.Module, x: torch.Tensor) -> bool:
    return x.dtype == torch.float32 and kernels_usable(weight)


# Rows dequantized at a time by the batched path: the whole matrix for a projection, slices of the
# 262k-row output matrix (a float copy of it would be the size of the model several times over).
BATCHED_BLOCK_ELEMENTS = 1 << 23


# float32 keeps evaluation exact (the dequantized weights are the reference's, bit for bit); generation's
# prefill asks for the CPU's fast dtype instead (bfloat16 where native: a prefill is compute-bound).
_batched_dtype: ContextVar[torch.dtype] = ContextVar("edgelm_batched_dtype", default=torch.float32)


@contextmanager
def batched_matmul_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Multiply many-token batches in `dtype` (float32 or bfloat16) inside the block."""
    token = _batched_dtype.set(dtype)
    try:
        yield
    finally:
        _batched_dtype.reset(token)


def _batched_matmul(km: kernels.KernelMatrix, x: torch.Tensor, out: torch.Tensor | None,
                    out_index: torch.Tensor | None) -> torch.Tensor:
    """x [T, in] @ Wᵀ for many tokens: the weight dequantized block by block by the kernels (on the calling
    thread: PyTorch's matmul threads are still spinning on the others) and multiplied by PyTorch."""
    dtype = _batched_dtype.get()
    xc = x.to(dtype)
    block = max(1, BATCHED_BLOCK_ELEMENTS // km.cols)
    if out is None and km.rows <= block:
        return F.linear(xc, km.dequantize(dtype=dtype, parallel=False)).to(torch.float32)
    if out is None:
        out = torch.empty(x.shape[0], km.rows)
    for first in range(0, km.rows, block):
        n = min(block, km.rows - first)
        y = F.linear(xc, km.dequantize(first, n, dtype=dtype, parallel=False))
        if out_index is None:
            out[:, first:first + n] = y
        else:
            out[:, out_index[first:first + n].long()] = y.to(out.dtype)
    return out


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
        # How `packed` stores the codes: "dense" (row-wise bit packing), "planes" (the kernels' layout,
        # edgelm/kernels/layout.py) or "chunk-planes" (format version 2's kernel layout, read from older
        # directories and converted on first use). All take exactly `bits` bits per code.
        self.layout = "dense"

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, scheme: QuantScheme,
                   zero_dtype: torch.dtype | None = None) -> PackedWeight:
        out, inp = codes.shape
        zero_dtype = zero_dtype or scheme.zero_dtype
        weight = cls(out, inp, scheme, zero_dtype)
        weight.packed.copy_(pack(codes, scheme.bits))
        weight.scales.copy_(scale.to(torch.float16))
        weight.zeros.copy_(zero.to(zero_dtype))
        return weight

    def select_rows(self, rows: torch.Tensor) -> PackedWeight:
        """A PackedWeight of just these rows (same format)."""
        part = PackedWeight(rows.numel(), self.in_features, self.scheme, self.zeros.dtype)
        part.layout = self.layout
        part.packed.copy_(self.packed[rows])
        part.scales.copy_(self.scales[rows])
        part.zeros.copy_(self.zeros[rows])
        return part

    def codes(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        packed = self.packed if rows is None else self.packed[rows]
        if self.layout == "planes":
            return from_planes(packed, self.scheme.bits, self.in_features)
        if self.layout == "chunk-planes":
            return from_chunk_planes(packed, self.scheme.bits, self.in_features)
        return unpack(packed, self.scheme.bits, self.in_features)

    def to_plane_layout(self) -> bool:
        """Store the codes in the kernels' plane layout from now on, replacing the other packing in place
        (a block of rows at a time: no second copy of the weight). False when the width does not allow it."""
        if self.layout == "planes":
            return True
        if self.in_features % CHUNK or self.packed.is_meta:
            return False
        planes = torch.empty_like(self.packed)  # the same bytes: both layouts take exactly `bits` per code
        for start in range(0, self.out_features, ROW_BLOCK):
            rows = torch.arange(start, min(start + ROW_BLOCK, self.out_features))
            planes[start:start + ROW_BLOCK] = to_planes(self.codes(rows), self.scheme.bits)
        self.packed = planes
        self.layout = "planes"
        self._kernel = None
        return True

    def dequantize(self, rows: torch.Tensor | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if rows is not None and rows.numel() <= LOOKUP_MAX_ROWS and dtype == torch.float32:
            km = self.kernel() if kernels_usable(self) else None
            if km is not None:  # token lookups while decoding: a few rows, in C (bit-exact)
                out = torch.empty(rows.numel(), self.in_features)
                for i, row in enumerate(rows.tolist()):
                    km.dequantize(row, 1, out=out[i:i + 1], parallel=False)
                return out
        scales = (self.scales if rows is None else self.scales[rows]).float()
        if self.scale_gain is not None:
            scales = scales * (self.scale_gain if rows is None else self.scale_gain[rows])
        zeros = self.zeros if rows is None else self.zeros[rows]
        return dequantize(self.codes(rows), scales, zeros.float(), self.scheme.group_size).to(dtype)

    @property
    def storage_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in (self.packed, self.scales, self.zeros)
                   if b is not self.zeros or not self.scheme.symmetric)

    def kernel(self) -> kernels.KernelMatrix | None:
        """This weight in the kernels' layout (built on first use), or None when the kernels cannot run it:
        an unsupported shape, or buffers outside host memory (the kernels are CPU code; a model moved to a
        GPU computes with PyTorch there)."""
        if getattr(self, "_kernel", None) is None:
            if self.packed.device.type != "cpu" or not kernels.supports(
                    self.scheme.bits, self.scheme.group_size, self.in_features, kernels.dtype_name(self.zeros)):
                return None
            self._kernel = kernels.KernelMatrix.from_packed(self)
        return self._kernel

    # The kernel copy shares scales and zeros but not the codes: drop it whenever the buffers are replaced.
    def _apply(self, fn, recurse=True):
        self._kernel = None
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs):
        self._kernel = None
        super()._load_from_state_dict(*args, **kwargs)

    def matmul(self, x: torch.Tensor, out: torch.Tensor | None = None, out_index: torch.Tensor | None = None,
               activations: kernels.QuantizedActivations | None = None) -> torch.Tensor:
        """x [T, in] @ Wᵀ -> [T, out] (or into columns out_index of `out`). `activations`: x already
        quantized for the kernels, when several matrices share it."""
        km = self.kernel() if batched_eligible(self, x) else None
        if km is not None and x.shape[0] <= KERNEL_MAX_TOKENS:
            return km.matvec(activations if activations is not None else x, out=out, out_index=out_index)
        if km is not None:
            return _batched_matmul(km, x, out, out_index)
        result = F.linear(x, self.dequantize(dtype=x.dtype))
        if out is None:
            return result
        out[:, out_index.long()] = result
        return out

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
        y = self.weight_q.matmul(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


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

    def project(self, h: torch.Tensor) -> torch.Tensor:
        """h [..., dim] -> logits [..., vocab]: the tied output matrix, without a float copy of it."""
        flat = h.reshape(-1, h.shape[-1])
        return self.weight_q.matmul(flat).reshape(*h.shape[:-1], self.num_embeddings)


class LowRankRows(nn.Module):
    """Rows W ~ C B: coefficients C [rows, rank] packed on a fitted grid per row, a float16 basis B [rank, in].

    For the rarest rows of a token embedding / tied output matrix: almost never looked up or predicted,
    they only need to keep their logits in the range of the model's typical contexts. Quantization noise
    there does harm (it lifts the tail of the softmax); a projection on the few directions that the final
    hidden states use does not. `fit` takes those directions from the output's input Hessian H (E[h hᵀ]).
    """

    def __init__(self, coefficients: PackedWeight, basis: torch.Tensor):
        super().__init__()
        self.coefficients = coefficients
        self.register_buffer("basis", basis.to(torch.float16))
        self.out_features, self.rank = coefficients.out_features, coefficients.in_features
        self.in_features = basis.shape[1]
        self.format = LowRankFormat(self.rank, coefficients.scheme.bits)
        self.scale_gain = None
        self._dense: torch.Tensor | None = None  # C dequantized, while it cannot change

    @classmethod
    def empty(cls, rows: int, in_features: int, fmt: LowRankFormat) -> LowRankRows:
        scheme = QuantScheme(fmt.bits, None, fit=True)
        return cls(PackedWeight(rows, fmt.rank, scheme, torch.float16), torch.zeros(fmt.rank, in_features))

    @classmethod
    def fit(cls, weight: torch.Tensor, fmt: LowRankFormat, hessian: torch.Tensor | None = None,
            damp: float = 0.01) -> LowRankRows:
        """The rank-r approximation of the rows that is best in the metric of H (plain SVD without H):
        with H + λI = Q Λ Qᵀ, rows in coordinates u = w Q Λ^½ (where squared error is logit error), their
        top principal directions P; then C = u Pᵀ and B = P Λ^-½ Qᵀ. Each coefficient column is scaled to
        unit mean square (the scale goes into B) so that one grid per row fits all of them."""
        w = weight.detach().double()
        n_in = w.shape[1]
        if hessian is None:
            to_metric = from_metric = torch.eye(n_in, dtype=torch.float64)
        else:
            h = hessian.detach().double()
            h = h + torch.eye(n_in, dtype=torch.float64) * damp * float(h.diagonal().mean() or 1.0)
            lam, q = torch.linalg.eigh(h)
            lam = lam.clamp_min(float(lam.max()) * 1e-12)
            to_metric, from_metric = q * lam.sqrt(), (q / lam.sqrt()).T
        u = w @ to_metric
        _, directions = torch.linalg.eigh(u.T @ u)
        top = directions[:, -fmt.rank:].flip(1).T  # [rank, in], largest variance first
        coefficients = u @ top.T
        spread = coefficients.pow(2).mean(0).sqrt().clamp_min(1e-12)
        coefficients = (coefficients / spread).float()
        basis = (spread[:, None] * (top @ from_metric)).float()
        scheme = QuantScheme(fmt.bits, None, fit=True)
        scale, zero = compute_params(coefficients, scheme)
        packed = PackedWeight.from_codes(quantize(coefficients, scale, zero, scheme), scale, zero, scheme)
        return cls(packed, basis)

    @property
    def scheme(self) -> QuantScheme:
        return self.coefficients.scheme

    def dense_coefficients(self) -> torch.Tensor:
        if self.coefficients.scale_gain is not None or torch.is_grad_enabled():
            return self.coefficients.dequantize()  # being trained: follow the scales
        if self._dense is None:
            self._dense = self.coefficients.dequantize()
        return self._dense

    def dequantize(self, rows: torch.Tensor | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        coefficients = self.dense_coefficients()
        if rows is not None:
            coefficients = coefficients[rows]
        return (coefficients @ self.basis.float()).to(dtype)

    @property
    def storage_bytes(self) -> int:
        return self.coefficients.storage_bytes + self.basis.numel() * self.basis.element_size()

    def _apply(self, fn, recurse=True):
        self._dense = None
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs):
        self._dense = None
        super()._load_from_state_dict(*args, **kwargs)

    def matmul(self, x: torch.Tensor, out: torch.Tensor | None = None,
               out_index: torch.Tensor | None = None) -> torch.Tensor:
        """x [T, in] @ Wᵀ -> [T, rows] (or into columns out_index of `out`): (x Bᵀ) Cᵀ, a few MACs per row."""
        result = (x.float() @ self.basis.float().T) @ self.dense_coefficients().T
        if out is None:
            return result.to(x.dtype)
        out[:, out_index.long()] = result.to(out.dtype)
        return out

    def extra_repr(self) -> str:
        return f"{self.out_features}x{self.in_features}, rank={self.rank}, bits={self.format.bits}"


class RowTieredWeight(nn.Module):
    """A matrix whose rows are split into tiers, each tier packed with its own format.

    For a token embedding / tied output matrix most rows are rare tokens that carry almost none of the
    probability mass and are rarely looked up: they can take far fewer bits than the frequent ones.
    `tier[r]` names the part holding row r; rows keep their order within a part.
    """

    def __init__(self, parts: list[PackedWeight], tier: torch.Tensor):
        super().__init__()
        self.parts = nn.ModuleList(parts)
        self.out_features, self.in_features = tier.numel(), parts[0].in_features
        self.register_buffer("tier", tier.to(torch.uint8))
        self.register_buffer("local", torch.empty(0, dtype=torch.int64), persistent=False)
        self.rows: list[torch.Tensor] = []
        self._index()
        self.scale_gain = None

    @classmethod
    def from_parts(cls, row_sets: list[torch.Tensor], parts: list[PackedWeight]) -> RowTieredWeight:
        """Part k holds the rows `row_sets[k]` (ascending), which together cover every row once."""
        n_rows = sum(rows.numel() for rows in row_sets)
        tier = torch.full((n_rows,), 255, dtype=torch.uint8)
        for k, rows in enumerate(row_sets):
            tier[rows] = k
        if (tier == 255).any():
            raise ValueError("row tiers must cover every row exactly once")
        return cls(parts, tier)

    def _index(self) -> None:
        """local[r]: the position of row r inside its part (derived, so not stored)."""
        if self.tier.is_meta:  # a model directory being built: indexed once the real tiers are loaded
            return
        local, rows = kernels.tier_index(self.tier.numpy(), len(self.parts))
        self.local = torch.from_numpy(local)
        self.rows = [torch.from_numpy(part) for part in rows]  # int32, as the kernels' output index wants them

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._kernel_parts = None
        self._index()

    @property
    def scheme(self) -> QuantScheme:
        """The format of the part holding the most rows (for summaries; each part has its own)."""
        counts = torch.bincount(self.tier.long(), minlength=len(self.parts))
        return self.parts[int(counts.argmax())].scheme

    def dequantize(self, rows: torch.Tensor | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if rows is None:
            rows = torch.arange(self.out_features)
        out = torch.empty(rows.numel(), self.in_features, dtype=dtype)
        if rows.numel() <= LOOKUP_MAX_ROWS:  # a few token lookups: row by row beats masking every tier
            for i, (k, local) in enumerate(zip(self.tier[rows].tolist(), self.local[rows].tolist())):
                out[i] = self.parts[k].dequantize(rows=torch.tensor([local]), dtype=dtype)[0]
            return out
        tiers = self.tier[rows]
        for k, part in enumerate(self.parts):
            mine = (tiers == k).nonzero().squeeze(1)
            if mine.numel():
                out[mine] = part.dequantize(rows=self.local[rows[mine]], dtype=dtype)
        return out

    @property
    def storage_bytes(self) -> int:
        return sum(p.storage_bytes for p in self.parts) + self.tier.numel()

    def kernel_parts(self) -> kernels.KernelParts | None:
        """The packed parts on the kernels as one job (built on first use), or None when one cannot run there.
        Low-rank parts are not in it: they take other inputs (x Bᵀ) and run on their own."""
        if getattr(self, "_kernel_parts", None) is None:
            packed = [(part.kernel(), rows) for part, rows in zip(self.parts, self.rows)
                      if isinstance(part, PackedWeight)]
            if not packed or any(m is None for m, _ in packed) or len(packed) > kernels.MAX_PARTS:
                return None
            self._kernel_parts = kernels.KernelParts([m for m, _ in packed], [rows for _, rows in packed])
        return self._kernel_parts

    def _apply(self, fn, recurse=True):
        self._kernel_parts = None
        return super()._apply(fn, recurse)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, in] @ Wᵀ -> [T, out]: each part computes its rows and writes them into their columns."""
        low_rank = [(part, rows) for part, rows in zip(self.parts, self.rows) if isinstance(part, LowRankRows)]
        parts = self.kernel_parts() if kernel_eligible(self, x) else None
        if parts is not None:
            out = parts.matvec(x, out=torch.empty(x.shape[0], self.out_features) if low_rank else None)
        else:
            out = torch.empty(x.shape[0], self.out_features, dtype=x.dtype)
            shared = kernels.QuantizedActivations(x) if kernel_eligible(self, x) else None  # quantized once
            for part, rows in zip(self.parts, self.rows):
                if isinstance(part, PackedWeight):
                    part.matmul(x, out=out, out_index=rows, activations=shared)
        for part, rows in low_rank:
            part.matmul(x, out=out, out_index=rows)
        return out

    def extra_repr(self) -> str:
        counts = torch.bincount(self.tier.long(), minlength=len(self.parts)).tolist()
        return ", ".join(f"{n} rows at rank {p.rank} ({p.format.bits}-bit coefficients)" if isinstance(p, LowRankRows)
                         else f"{n} rows at {p.scheme.bits} bits/g{p.scheme.group_size}" for n, p in zip(counts, self.parts))
