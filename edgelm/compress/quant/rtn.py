"""Round-to-nearest quantization: each group's range from its min/max (or absmax), no data needed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from edgelm.compress.quant.modules import PackedWeight, QuantizedEmbedding, QuantizedLinear
from edgelm.compress.quant.primitives import QuantScheme, compute_params, quantize
from edgelm.compress.recipe import Step, progress, replace_module, target_modules
from edgelm.errors import RecipeError


def rtn_quantize_weight(weight: torch.Tensor, scheme: QuantScheme) -> PackedWeight:
    w = weight.detach().float()
    scale, zero = compute_params(w, scheme)
    return PackedWeight.from_codes(quantize(w, scale, zero, scheme), scale, zero, scheme)


def swap_in_quantized(model: nn.Module, name: str, module: nn.Module, weight: PackedWeight) -> None:
    """Replace a Linear/Embedding by its quantized counterpart holding `weight`."""
    if isinstance(module, nn.Embedding):
        replace_module(model, name, QuantizedEmbedding(weight))
    else:
        replace_module(model, name, QuantizedLinear(weight, module.bias))


@dataclass(frozen=True)
class QuantStep(Step):
    """Fields every weight quantizer shares."""

    bits: int = 4
    group_size: int | None = 64
    symmetric: bool = False
    fit: bool = False  # least-squares scales and fp16 zero points per group (primitives.fitted_params)
    embedding: bool = True  # the token embedding / tied output: most of a small model's bytes
    ignore: tuple[str, ...] = ()  # module-name globs left unquantized, e.g. "layers.0.*"

    def __post_init__(self) -> None:
        if self.bits not in (2, 3, 4, 5, 6, 8):
            raise RecipeError(f"{self.name}: bits must be one of 2, 3, 4, 5, 6, 8, got {self.bits}")
        if self.fit and self.symmetric:
            raise RecipeError(f"{self.name}: a fitted grid has its own zero points; use fit or symmetric, not both")
        if self.group_size is not None and self.group_size not in (16, 32, 64, 128, 256):
            raise RecipeError(f"{self.name}: group_size must be 16, 32, 64, 128, 256 or null (per channel), "
                              f"got {self.group_size}")

    @property
    def scheme(self) -> QuantScheme:
        return QuantScheme(self.bits, self.group_size, self.symmetric, self.fit)


@dataclass(frozen=True)
class RTN(QuantStep):
    name: ClassVar[str] = "rtn"

    def apply(self, model: nn.Module, calibration: Any = None) -> nn.Module:
        for name, module in progress(target_modules(model, embedding=self.embedding, ignore=self.ignore),
                                     self.name, "tensor"):
            swap_in_quantized(model, name, module, rtn_quantize_weight(module.weight, self.scheme))
        return model
