"""SparseGPT (Frantar & Alistarh 2023): one-shot pruning with OBS error compensation.

With H = 2/n XᵀX of the layer's calibration inputs, pruning weight w_j of a row costs w_j² / [H⁻¹]_jj,
and the best correction of the row's remaining weights is -(w_j / [H⁻¹]_jj) · H⁻¹_{j,:}. Columns are
processed left to right through the upper Cholesky factor of H⁻¹ (as GPTQ), so each step only touches
the columns not yet visited; the mask is chosen lazily, per block of columns (or per N:M group), from the
already-compensated weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from edgelm.compress.prune.common import PruneStep, prune_blocks_sequentially, write_weight
from edgelm.compress.prune.masks import SparsityPattern, lowest_per_row, n_of_m_mask, prune_count
from edgelm.errors import RecipeError


class InputHessian:
    """Running XᵀX of a layer's inputs; hessian() = 2/n XᵀX."""

    def __init__(self, layer: nn.Linear):
        self.gram = torch.zeros(layer.in_features, layer.in_features)
        self.n_tokens = 0

    def add(self, x: torch.Tensor) -> None:
        self.gram = self.gram + x.T @ x
        self.n_tokens += x.shape[0]

    def hessian(self) -> torch.Tensor:
        return self.gram * (2.0 / max(self.n_tokens, 1))


def inverse_hessian_factor(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor U of (H + λI)⁻¹ = UᵀU, λ = damp · mean(diag H); more damping if H is singular."""
    h = hessian.clone()
    for attempt in range(5):
        damped = h + torch.eye(h.shape[0]) * (damp * 10 ** attempt * h.diagonal().mean())
        lower, info = torch.linalg.cholesky_ex(damped)
        if info == 0:
            return torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True)
    raise RecipeError("sparsegpt: the input Hessian stays singular even with 10000× damping; raise damp")


def obs_score(weights: torch.Tensor, inverse_diagonal: torch.Tensor) -> torch.Tensor:
    """OBS error of pruning each weight alone, w² / [H⁻¹]_jj, given the earlier columns are already fixed:
    that [H⁻¹]_jj is U_jj², U the upper Cholesky factor of H⁻¹ (whose diagonal is passed in)."""
    return weights.pow(2) / inverse_diagonal[None, :].pow(2)


def sparsegpt_prune(weight: torch.Tensor, hessian: torch.Tensor, pattern: SparsityPattern,
                    damp: float = 0.01, block_size: int = 128) -> torch.Tensor:
    w = weight.detach().float().clone()
    h = hessian.detach().float().clone()
    dead = h.diagonal() == 0  # inputs that were always zero: their weights do nothing, prune them
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    hinv = inverse_hessian_factor(h, damp)

    n_inputs = w.shape[1]
    for start in range(0, n_inputs, block_size):
        end = min(start + block_size, n_inputs)
        block = w[:, start:end].clone()
        hinv_block = hinv[start:end, start:end]
        diagonal = hinv_block.diagonal()
        errors = torch.zeros_like(block)
        if pattern.structured:
            mask = torch.zeros_like(block, dtype=torch.bool)  # filled group by group below
        else:
            count = prune_count(end, pattern.fraction) - prune_count(start, pattern.fraction)
            mask = lowest_per_row(obs_score(block, diagonal), count)

        for j in range(end - start):
            if pattern.structured and j % pattern.group == 0:
                group = slice(j, j + pattern.group)
                mask[:, group] = n_of_m_mask(obs_score(block[:, group], diagonal[group]),
                                             pattern.keep, pattern.group)
            column = block[:, j]
            kept = column.masked_fill(mask[:, j], 0.0)
            error = (column - kept) / hinv_block[j, j]
            # Compensate the not-yet-visited columns of the block for the pruned weights of column j.
            block[:, j:] -= error[:, None] * hinv_block[j, j:][None, :]
            block[:, j] = kept  # the update leaves kept up to rounding; store exact zeros
            errors[:, j] = error

        w[:, start:end] = block
        w[:, end:] -= errors @ hinv[start:end, end:]  # the block's accumulated correction, in one product
    return w


@dataclass(frozen=True)
class SparseGPT(PruneStep):
    name: ClassVar[str] = "sparsegpt"
    needs_calibration: ClassVar[bool] = True

    damp: float = 0.01  # fraction of the mean Hessian diagonal added to it
    block_size: int = 128  # columns whose mask is chosen together (lazy batch updates)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.damp > 0:
            raise RecipeError(f"sparsegpt: damp must be positive, got {self.damp!r}")
        if self.block_size <= 0:
            raise RecipeError(f"sparsegpt: block_size must be positive, got {self.block_size!r}")
        pattern = self.pattern
        if pattern.structured and self.block_size % pattern.group:
            raise RecipeError(f"sparsegpt: block_size {self.block_size} must be a multiple of M={pattern.group} "
                              f"for sparsity '{self.sparsity}', so that no N:M group straddles two blocks")

    def apply(self, model: nn.Module, calibration: Any = None) -> nn.Module:
        self.require_calibration(calibration)
        pattern = self.pattern

        def prune_layer(layer: nn.Linear, inputs: InputHessian) -> None:
            pruned = sparsegpt_prune(layer.weight, inputs.hessian(), pattern, self.damp, self.block_size)
            write_weight(layer, pruned)

        prune_blocks_sequentially(model, calibration, self.targets(model), InputHessian, prune_layer,
                                  "sparsegpt")
        return model
