"""Sparsity patterns and mask selection from a score, independent of any model or algorithm.

A pattern is either unstructured (a fraction of zeros in every output row, as Wanda compares weights per
row) or N:M (in every group of M consecutive input weights of a row, N are kept). Masks are boolean
tensors shaped like the weight, True where a weight is pruned; the lowest scores are pruned.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch

from edgelm.errors import RecipeError

_NM = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


@dataclass(frozen=True)
class SparsityPattern:
    fraction: float  # zeros per row (for N:M: 1 - N/M)
    keep: int | None = None  # N of N:M, None for unstructured
    group: int | None = None  # M of N:M

    @property
    def structured(self) -> bool:
        return self.group is not None

    def __str__(self) -> str:
        return f"{self.keep}:{self.group}" if self.structured else f"{self.fraction:g}"


def parse_sparsity(value: Any, step: str) -> SparsityPattern:
    """A float in [0, 1) or an 'N:M' string with 0 < N < M; anything else is a RecipeError naming it."""
    usage = "a fraction in [0, 1) or 'N:M' with 0 < N < M, such as '2:4'"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if not 0.0 <= float(value) < 1.0:
            raise RecipeError(f"{step}: sparsity must be {usage}, got {value!r}")
        return SparsityPattern(float(value))
    if isinstance(value, str):
        match = _NM.match(value)
        if match is None:
            raise RecipeError(f"{step}: sparsity must be {usage}, got {value!r}")
        keep, group = int(match[1]), int(match[2])
        if not 0 < keep < group:
            raise RecipeError(f"{step}: sparsity {value!r} keeps N={keep} of M={group}: N:M needs 0 < N < M, "
                              "e.g. '2:4'")
        return SparsityPattern(1.0 - keep / group, keep, group)
    raise RecipeError(f"{step}: sparsity must be {usage}, got {value!r}")


def prune_count(n_inputs: int, fraction: float) -> int:
    """Weights pruned per row among the first n_inputs (floor, as Wanda). Block-wise callers take
    prune_count(end) - prune_count(start) so that the blocks add up to exactly the row's total."""
    return int(n_inputs * fraction)


def lowest_per_row(score: torch.Tensor, count: int) -> torch.Tensor:
    """Mask of the `count` lowest scores of every row."""
    mask = torch.zeros_like(score, dtype=torch.bool)
    if count > 0:
        mask.scatter_(1, torch.topk(score, count, dim=1, largest=False).indices, True)
    return mask


def n_of_m_mask(score: torch.Tensor, keep: int, group: int) -> torch.Tensor:
    """Mask pruning the group - keep lowest scores in every group of `group` consecutive columns."""
    rows, cols = score.shape
    grouped = score.reshape(rows, cols // group, group)
    mask = torch.zeros_like(grouped, dtype=torch.bool)
    mask.scatter_(2, torch.topk(grouped, group - keep, dim=2, largest=False).indices, True)
    return mask.reshape(rows, cols)


def pruning_mask(score: torch.Tensor, pattern: SparsityPattern) -> torch.Tensor:
    """Mask of the weights to prune under `pattern`, lowest scores first, compared within each row."""
    if pattern.structured:
        return n_of_m_mask(score, pattern.keep, pattern.group)
    return lowest_per_row(score, prune_count(score.shape[1], pattern.fraction))
