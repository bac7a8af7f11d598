"""Magnitude pruning: the smallest |W| of every row (or of every N:M group) go; no data needed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from edgelm.compress.prune.common import PruneStep, write_weight
from edgelm.compress.prune.masks import SparsityPattern, pruning_mask


def magnitude_prune(weight: torch.Tensor, pattern: SparsityPattern) -> torch.Tensor:
    w = weight.detach().float()
    return w.masked_fill(pruning_mask(w.abs(), pattern), 0.0)


@dataclass(frozen=True)
class Magnitude(PruneStep):
    name: ClassVar[str] = "magnitude"

    def apply(self, model: nn.Module, calibration: Any = None) -> nn.Module:
        pattern = self.pattern
        for _, module in self.targets(model):
            write_weight(module, magnitude_prune(module.weight, pattern))
        return model
