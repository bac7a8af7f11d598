"""GPTQ (Frantar et al. 2022): weight quantization with second-order error feedback.

For a linear layer with calibration inputs X, GPTQ minimizes ||X Wᵀ - X Ŵᵀ||² column by column: with
H = 2/n XᵀX, quantizing column j leaves an error e_j that is compensated on the not-yet-quantized columns
by -e_j / U_jj · U_{j,:}, U the upper Cholesky factor of H⁻¹. Columns are swept in blocks (lazy batch
updates: the error of a block reaches the columns after it in one matrix product), optionally in order of
decreasing diag(H) ("act_order": the most important inputs are quantized first, while the most columns
remain to absorb their error).

Storage keeps groups of consecutive *original* columns. Without act_order a group's scale/zero come from
its current (error-updated) weights when the sweep reaches its first column; with act_order the sweep
would reach a group's columns scattered over time, so its parameters are fixed from the original weights
beforehand ("static groups"). Either way codes are stored in the original column order.

The math (`gptq_quantize`) is kept apart from the glue that walks the model (`GPTQ.apply`).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from edgelm.compress.calibration import BlockRunner, SharedGram, capture_inputs, linear_layers
from edgelm.compress.quant.modules import LowRankRows, PackedWeight, RowTieredWeight
from edgelm.compress.quant.primitives import LowRankFormat, QuantScheme, compute_params, nearest_codes
from edgelm.compress.quant.rtn import QuantStep, rtn_quantize_weight, swap_in_quantized
from edgelm.compress.recipe import progress, target_modules
from edgelm.errors import RecipeError


# -- math --------------------------------------------------------------------------------------------------
@dataclass
class GPTQResult:
    codes: torch.Tensor  # uint8 [out, in], original column order
    scale: torch.Tensor  # [out, n_groups], already rounded to the fp16 the artifact stores
    zero: torch.Tensor  # [out, n_groups]
    dequantized: torch.Tensor  # the weights the sweep settled on, (codes - zero) * scale

    def packed(self, scheme: QuantScheme) -> PackedWeight:
        return PackedWeight.from_codes(self.codes, self.scale, self.zero, scheme)


class InputHessian:
    """H = 2/n Σ xᵀx of a layer's inputs, summed in float64 (many batches of float32 products)."""

    def __init__(self, n_features: int):
        self.gram = torch.zeros(n_features, n_features, dtype=torch.float64)
        self.n_tokens = 0

    def add_gram(self, gram: torch.Tensor, n_tokens: int) -> None:
        self.gram += gram.double()
        self.n_tokens += n_tokens

    def add(self, x: torch.Tensor) -> None:
        self.add_gram(x.T @ x, x.shape[0])

    def hessian(self) -> torch.Tensor:
        return (self.gram * (2.0 / max(self.n_tokens, 1))).float()


def inverse_hessian_factor(hessian: torch.Tensor, damp: float, max_attempts: int = 6) -> torch.Tensor:
    """Upper Cholesky factor U of (H + λI)⁻¹ = UᵀU with λ = damp · mean(diag H); retries with 10× the damping
    while H + λI is not numerically positive definite."""
    n = hessian.shape[0]
    mean_diagonal = float(hessian.diagonal().mean()) or 1.0
    for attempt in range(max_attempts):
        factor = damp * 10 ** attempt
        damped = hessian + torch.eye(n, dtype=hessian.dtype) * (factor * mean_diagonal)
        lower, info = torch.linalg.cholesky_ex(damped)
        if info == 0:
            upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
            if info == 0:
                if attempt:
                    warnings.warn(f"gptq: Hessian not positive definite with damp={damp}; "
                                  f"used damp={factor:g} instead", stacklevel=2)
                return upper
    raise RecipeError(f"gptq: the input Hessian stays singular even with damp={damp * 10 ** (max_attempts - 1):g}")


def storable_params(w: torch.Tensor, scheme: QuantScheme) -> tuple[torch.Tensor, torch.Tensor]:
    """Group scales/zeros of W, with scales rounded to fp16 as PackedWeight stores them, so the weights the
    sweep compensates for are exactly the ones the artifact will hold."""
    scale, zero = compute_params(w, scheme)
    return scale.half().float(), zero.half().float() if scheme.fit else zero


def quantize_column(column: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                    scheme: QuantScheme) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes and dequantized values of one column (one entry per row) under per-row scale/zero."""
    safe_scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # fp16 underflow: all-zero groups
    codes = nearest_codes(column, safe_scale, zero, scheme).clamp_(0, scheme.qmax)
    return codes, (codes - zero) * scale


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, scheme: QuantScheme, *, damp: float = 0.01,
                  block_size: int = 128, act_order: bool = True, zero_dead_columns: bool = True,
                  row_chunk: int = 16384) -> GPTQResult:
    """Quantize W [out, in] given the Hessian H [in, in] of its inputs.

    Rows are independent given H, so they are processed in chunks of `row_chunk` (a 262144-row embedding
    never needs more than one chunk of working memory). Columns whose input is always zero (diag H = 0)
    are zeroed when `zero_dead_columns` (a linear layer: they do nothing) and otherwise just rounded
    (a tied embedding: its rows are also looked up).
    """
    w = weight.detach().float()
    h = hessian.detach().float().clone()
    n_inputs = w.shape[1]
    group_size = scheme.group_size or n_inputs
    scheme.n_groups(n_inputs)  # validates the width

    dead = h.diagonal() == 0
    h[dead, dead] = 1.0  # keeps H invertible; those columns then get no error feedback
    if zero_dead_columns and dead.any():
        w = w.clone()
        w[:, dead] = 0.0

    order = torch.argsort(h.diagonal(), descending=True) if act_order else torch.arange(n_inputs)
    upper = inverse_hessian_factor(h[order][:, order].double(), damp).float()  # float64: cheap, H is small

    pruned = weight.detach() == 0  # zeros a pruning step left: they stay exactly zero (SparseGPT + GPTQ)
    if not pruned.any():
        pruned = None
    chunks = [_sweep(w[rows], upper, order, scheme, group_size, block_size, static_groups=act_order,
                     pruned=None if pruned is None else pruned[rows])
              for rows in torch.arange(w.shape[0]).split(row_chunk)]
    codes, scale, zero, dequantized = (torch.cat(parts) for parts in zip(*chunks))
    return GPTQResult(codes, scale, zero, dequantized)


def _sweep(w: torch.Tensor, upper: torch.Tensor, order: torch.Tensor, scheme: QuantScheme, group_size: int,
           block_size: int, static_groups: bool, pruned: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """The GPTQ column sweep over rows of W (original column order in and out; swept in `order`).

    Entries marked `pruned` get the zero point's code (exactly 0.0) whatever the error feedback made of
    them; their whole value then becomes error that the later columns absorb, as in SparseGPT."""
    n_rows, n_inputs = w.shape
    n_groups = n_inputs // group_size
    per_row = QuantScheme(scheme.bits, None, scheme.symmetric, scheme.fit)  # parameters of one group, row by row
    if static_groups:
        scale, zero = storable_params(w, scheme)
    else:
        scale = torch.zeros(n_rows, n_groups)
        zero = torch.zeros(n_rows, n_groups)
    group_of = order // group_size  # the (original-layout) group of each swept column

    w = w[:, order]  # a copy: error feedback updates it in place
    if pruned is not None:
        pruned = pruned[:, order]
    codes = torch.empty(n_rows, n_inputs)
    dequantized = torch.empty(n_rows, n_inputs)
    for start in range(0, n_inputs, block_size):
        end = min(start + block_size, n_inputs)
        block = w[:, start:end]  # a view: updated in place
        u_block = upper[start:end, start:end]
        errors = torch.empty_like(block)
        for j in range(end - start):
            col = start + j
            if not static_groups and col % group_size == 0:
                # Identity order: the group is columns [col, col + group_size), as updated so far.
                group = torch.cat([block[:, j:j + group_size], w[:, end:col + group_size]], dim=1)
                g = col // group_size
                s, z = storable_params(group, per_row)
                scale[:, g], zero[:, g] = s[:, 0], z[:, 0]
            g = int(group_of[col])
            codes[:, col], dequantized[:, col] = quantize_column(block[:, j], scale[:, g], zero[:, g], scheme)
            if pruned is not None:
                keep_zero = pruned[:, col]
                codes[keep_zero, col] = zero[keep_zero, g]
                dequantized[keep_zero, col] = 0.0
            error = (block[:, j] - dequantized[:, col]) / u_block[j, j]
            block[:, j:] -= error[:, None] * u_block[j, j:][None, :]  # feedback inside the block
            errors[:, j] = error
        w[:, end:] -= errors @ upper[start:end, end:]  # lazy update of the columns after the block

    restore = torch.argsort(order)
    return codes[:, restore].to(torch.uint8), scale, zero, dequantized[:, restore]


# -- glue: walking the model -------------------------------------------------------------------------------
@dataclass(frozen=True)
class GPTQ(QuantStep):
    name: ClassVar[str] = "gptq"
    needs_calibration: ClassVar[bool] = True

    damp: float = 0.01  # fraction of the mean Hessian diagonal added to it
    act_order: bool = True  # sweep columns in order of decreasing diag(H)
    block_size: int = 128  # columns per lazy batch update
    batch_size: int = 4  # calibration samples per forward

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.damp > 0:
            raise RecipeError(f"gptq: damp must be positive, got {self.damp!r}")
        if self.block_size <= 0:
            raise RecipeError(f"gptq: block_size must be positive, got {self.block_size!r}")
        if self.batch_size <= 0:
            raise RecipeError(f"gptq: batch_size must be positive, got {self.batch_size!r}")

    def apply(self, model: nn.Module, calibration: Any = None) -> nn.Module:
        if calibration is None:
            raise RecipeError("gptq needs calibration data: pass a text file (--calib FILE) or use data-free "
                              "calibration sampled from the model itself")
        schemes = {name: self.scheme for name, _ in target_modules(model, embedding=self.embedding, ignore=self.ignore)}
        return gptq_model(model, calibration, schemes, damp=self.damp, act_order=self.act_order,
                          block_size=self.block_size, batch_size=self.batch_size)


def gptq_model(model: nn.Module, calibration: Any, schemes: dict[str, QuantScheme | list], *, damp: float = 0.01,
               act_order: bool = True, block_size: int = 128, batch_size: int = 4) -> nn.Module:
    """GPTQ on every module named in `schemes`, each with its own scheme (mixed precision uses this), block by
    block: each block's Hessians are measured on the outputs of the already-quantized blocks before it.
    The embedding's entry may instead be a row-tier plan, [(rows, scheme or packed part), ...]."""
    def quantize(module: nn.Module, hessian: torch.Tensor, scheme: QuantScheme):
        return gptq_quantize(module.weight, hessian, scheme, damp=damp, block_size=block_size,
                             act_order=act_order).packed(scheme)

    modules = dict(model.named_modules())
    targets = {id(modules[name]): name for name in schemes}  # module identity -> its name in the model
    runner = BlockRunner(model, calibration, batch_size=batch_size)
    for i, block in enumerate(progress(model.layers, "gptq", "block")):
        layers = {name: m for name, m in linear_layers(block).items() if id(m) in targets}
        hessians = {name: InputHessian(m.in_features) for name, m in layers.items()}
        with capture_inputs(layers, SharedGram(hessians).observe):  # q/k/v and gate/up share one XᵀX
            runner.run(i)
        for name, module in layers.items():
            full_name = targets[id(module)]
            packed = quantize(module, hessians[name].hessian(), schemes[full_name])
            swap_in_quantized(model, full_name, module, packed)
        del hessians  # a block's Hessians can be large; free them before the next block
        runner.advance(i)  # the next block sees the quantized block's outputs

    # The output matrix (the tied embedding, or a separate head) sees the final hidden states. A separate
    # token embedding only has lookups, which no Hessian describes, so it gets RTN.
    tied = model.output is None
    head = model.tok_embeddings if tied else model.output
    if id(head) in targets:
        inputs = InputHessian(head.weight.shape[1])
        for batch in runner.final_hidden().split(batch_size):
            inputs.add(batch.reshape(-1, batch.shape[-1]).float())
        name = targets[id(head)]
        hessian = inputs.hessian()
        # The tied matrix is also looked up row by row: never zero its columns.
        packed = quantize_rows(head.weight, schemes[name], lambda w, scheme: gptq_quantize(
            w, hessian, scheme, damp=damp, block_size=block_size, act_order=act_order,
            zero_dead_columns=not tied).packed(scheme), hessian=hessian)
        swap_in_quantized(model, name, head, packed)
    embedding = model.tok_embeddings
    if not tied and id(embedding) in targets:
        name = targets[id(embedding)]
        swap_in_quantized(model, name, embedding, quantize_rows(embedding.weight, schemes[name], rtn_quantize_weight))
    return model


def quantize_rows(weight: torch.Tensor, plan: QuantScheme | list, quantize,
                  hessian: torch.Tensor | None = None) -> nn.Module:
    """`quantize(weight, scheme)` for one scheme, or a row-tiered weight for a plan of (rows, how) tiers, how
    being a scheme, an already packed part or a low-rank format (fitted in the metric of `hessian`, the
    inputs' Hessian when the matrix is an output matrix)."""
    if isinstance(plan, QuantScheme):
        return quantize(weight, plan)

    def part(rows: torch.Tensor, how) -> nn.Module:
        if isinstance(how, PackedWeight):
            return how
        if isinstance(how, LowRankFormat):
            return LowRankRows.fit(weight[rows], how, hessian)
        return quantize(weight[rows], how)

    return RowTieredWeight.from_parts([rows for rows, _ in plan], [part(rows, how) for rows, how in plan])
