"""Keep the source file's own quantization: no second rounding for tensors that are already quantized.

A model loaded from a quantized GGUF holds dequantized floats. Re-quantizing those floats to a new grid
rounds twice; when the target format is no smaller than the file's, the best possible result is the file's
own grid. `source_weight` rebuilds a module's weight as edgelm's packed format from the file's blocks
(see `edgelm.io.ggml_grids`), and the `source` step swaps every such module in: lossless, the file's
bits per weight (K-quants cost ~0.5 bit more, their 6-bit sub-scales being stored as fp16). Mixed precision
offers the source grid as one more candidate per tensor, with zero damage.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from edgelm.compress.quant.modules import PackedWeight
from edgelm.compress.quant.primitives import QuantScheme, pack
from edgelm.compress.quant.rtn import swap_in_quantized
from edgelm.compress.recipe import Step, target_modules


class SourceGrids:
    """Packed weights from the model's source GGUF, for modules whose weights still equal the file's."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.file = None
        self.names: dict[str, str] = {}
        source = getattr(model, "source", None)
        if source and str(source).endswith(".gguf"):
            from edgelm.io.gguf import GGUFFile
            from edgelm.models import architecture_module

            try:
                self.file = GGUFFile(source)
            except OSError:
                return  # the source moved away: nothing to keep
            self.names = architecture_module(model.args.arch).tensor_names(model.args)

    def weight(self, module_name: str, module: nn.Module) -> PackedWeight | None:
        """The source grid of `module`'s weight, or None (no quantized source, or the weight changed since)."""
        tensor_name = self.names.get(f"{module_name}.weight")
        if self.file is None or tensor_name is None:
            return None
        info = self.file.tensors[tensor_name]
        packed = packed_from_ggml(info.type_name, info.data, tuple(module.weight.shape))
        if packed is None:
            return None
        current = module.weight.detach().float()
        # A pruning or distillation step before this one changed the weights: the file no longer describes them.
        tolerance = 2e-3 * float(current.abs().max())
        if not torch.allclose(packed.dequantize(), current, rtol=0, atol=tolerance):
            return None
        return packed


GGML_ROW_BLOCK = 8192  # rows decoded at a time: bounds the temporaries for a 262k-row embedding


def packed_from_ggml(type_name: str, raw, shape: tuple[int, int]) -> PackedWeight | None:
    """A ggml-quantized 2-D tensor as edgelm's packed weight on the same grid (None: no such grid), built
    a block of rows at a time straight into the kernels' plane layout where the width allows."""
    from edgelm.io.ggml_grids import DECODERS, decode_grid
    from edgelm.kernels.layout import CHUNK, to_planes

    if type_name not in DECODERS:  # float tensors: nothing to convert (and no byte copy of them to make)
        return None
    rows, cols = shape
    raw = np.asarray(raw, dtype=np.uint8).reshape(rows, -1)
    planes = cols % CHUNK == 0
    weight = None
    for start in range(0, rows, GGML_ROW_BLOCK):
        grid = decode_grid(type_name, raw[start:start + GGML_ROW_BLOCK], (min(GGML_ROW_BLOCK, rows - start), cols))
        if grid is None:  # not a grid edgelm's packed format holds (decided by the type: on the first block)
            return None
        if weight is None:
            scheme = QuantScheme(grid.bits, grid.group_size, grid.symmetric)
            weight = PackedWeight(rows, cols, scheme, zero_dtype=torch.uint8 if grid.symmetric else torch.float16)
        codes = torch.from_numpy(grid.codes)
        block = slice(start, start + codes.shape[0])
        weight.packed[block] = to_planes(codes, scheme.bits) if planes else pack(codes, scheme.bits)
        weight.scales[block] = torch.from_numpy(grid.scale).to(torch.float16)
        weight.zeros[block] = torch.from_numpy(grid.zero).to(weight.zeros.dtype)
    weight.layout = "planes" if planes else "dense"
    return weight


@dataclass(frozen=True)
class KeepSource(Step):
    """Swap in the source file's quantized grids for every layer (and the embedding) that has one."""

    name: ClassVar[str] = "source"

    embedding: bool = True
    ignore: tuple[str, ...] = ()

    def apply(self, model: nn.Module, calibration: Any = None) -> nn.Module:
        grids = SourceGrids(model)
        for name, module in target_modules(model, embedding=self.embedding, ignore=self.ignore):
            packed = grids.weight(name, module)
            if packed is not None:
                swap_in_quantized(model, name, module, packed)
        return model
