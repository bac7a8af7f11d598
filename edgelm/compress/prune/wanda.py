"""Wanda (Sun et al. 2023): prune by |W_ij| · ‖X_j‖₂, compared within each output row.

The activation norm of input channel j weighs every weight it multiplies, so the few outlier channels of
a language model keep their weights even when those are small. No weight update, one pass per block.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from edgelm.compress.prune.common import PruneStep, prune_blocks_sequentially, write_weight
from edgelm.compress.prune.masks import SparsityPattern, pruning_mask


class InputNorms:
    """Running sum of x_j² per input channel."""

    def __init__(self, layer: nn.Linear):
        self.squares = torch.zeros(layer.in_features)

    def add(self, x: torch.Tensor) -> None:
        self.squares = self.squares + x.pow(2).sum(0)

    def norms(self) -> torch.Tensor:
        return self.squares.sqrt()


def wanda_prune(weight: torch.Tensor, input_norms: torch.Tensor, pattern: SparsityPattern) -> torch.Tensor:
    w = weight.detach().float()
    score = w.abs() * input_norms.float()[None, :]
    return w.masked_fill(pruning_mask(score, pattern), 0.0)


@dataclass(frozen=True)
class Wanda(PruneStep):
    name: ClassVar[str] = "wanda"
    needs_calibration: ClassVar[bool] = True

    def apply(self, model: nn.Module, calibration: Any = None) -> nn.Module:
        self.require_calibration(calibration)
        pattern = self.pattern

        def prune_layer(layer: nn.Linear, inputs: InputNorms) -> None:
            write_weight(layer, wanda_prune(layer.weight, inputs.norms(), pattern))

        prune_blocks_sequentially(model, calibration, self.targets(model), InputNorms, prune_layer, "wanda")
        return model
