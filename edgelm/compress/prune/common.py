"""Glue shared by the pruning steps: the step fields, which layers are pruned, the sequential block walk.

Pruned weights stay in the dense nn.Linear as exact zeros; quantizers that run afterwards take
`weight == 0` as the mask. The output matrix (tied embedding or separate head) is never pruned: it is
the most sensitive matrix of a small model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from edgelm.compress.calibration import BlockRunner, SharedGram, capture_inputs, linear_layers
from edgelm.compress.prune.masks import SparsityPattern, parse_sparsity
from edgelm.compress.recipe import Step, progress, target_modules
from edgelm.errors import RecipeError


@dataclass(frozen=True)
class PruneStep(Step):
    """Fields every pruning method shares."""

    sparsity: float | str = 0.5  # fraction of zeros per row, or "N:M" (keep N of every M inputs)
    ignore: tuple[str, ...] = ()  # module-name globs left dense, e.g. "layers.0.*"

    def __post_init__(self) -> None:
        parse_sparsity(self.sparsity, self.name)  # fail at recipe time, not halfway through a model

    @property
    def pattern(self) -> SparsityPattern:
        return parse_sparsity(self.sparsity, self.name)

    def targets(self, model: nn.Module) -> list[tuple[str, nn.Linear]]:
        targets = prunable_linears(model, self.ignore)
        check_pattern_fits(targets, self.pattern, self.name)
        return targets

    def require_calibration(self, calibration: Any) -> None:
        if calibration is None:
            raise RecipeError(f"{self.name} needs calibration text (--calib FILE, or data-free samples)")


def prunable_linears(model: nn.Module, ignore: tuple[str, ...] = ()) -> list[tuple[str, nn.Linear]]:
    """Every nn.Linear except the output head, minus names matching `ignore` globs."""
    head = getattr(model, "output", None)
    return [(name, module) for name, module in target_modules(model, embedding=False, ignore=ignore)
            if module is not head]


def check_pattern_fits(targets: list[tuple[str, nn.Linear]], pattern: SparsityPattern, step: str) -> None:
    if not pattern.structured:
        return
    for name, module in targets:
        if module.in_features % pattern.group:
            raise RecipeError(f"{step}: sparsity '{pattern}' needs input widths divisible by {pattern.group}, "
                              f"but {name} has {module.in_features} inputs; ignore it or choose another M")


def sparsity_of(model: nn.Module) -> float:
    """Fraction of exact zeros over the prunable linear weights (the output head not counted)."""
    zeros = total = 0
    for _, module in prunable_linears(model):
        zeros += int((module.weight == 0).sum())
        total += module.weight.numel()
    return zeros / max(total, 1)


def write_weight(module: nn.Linear, weight: torch.Tensor) -> None:
    with torch.no_grad():
        module.weight.copy_(weight.to(module.weight.dtype))


class InputStatistics(Protocol):
    """What a method accumulates from a layer's inputs x [tokens, in_features]."""

    def add(self, x: torch.Tensor) -> None: ...


def prune_blocks_sequentially(model: nn.Module, calibration: Any, targets: list[tuple[str, nn.Linear]],
                              new_statistics: Callable[[nn.Linear], InputStatistics],
                              prune_layer: Callable[[nn.Linear, InputStatistics], None], desc: str) -> None:
    """Block by block: observe the inputs of the block's target linears on the calibration data, prune
    them, then pass the *pruned* block's outputs on, so later blocks adapt to the earlier pruning."""
    wanted = {id(module) for _, module in targets}
    runner = BlockRunner(model, calibration)
    for i, block in enumerate(progress(model.layers, desc, "block")):
        layers = {name: m for name, m in linear_layers(block).items() if id(m) in wanted}
        statistics = {name: new_statistics(m) for name, m in layers.items()}
        with capture_inputs(layers, SharedGram(statistics).observe):
            runner.run(i)
        for name, module in layers.items():
            prune_layer(module, statistics[name])
        del statistics  # Hessians of a block can be large; free them before the next one
        runner.advance(i)
