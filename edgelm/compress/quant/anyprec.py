"""Any-precision quantization: one stored model from which every bit width min_bits..max_bits is derived.

Codes are quantized once at `max_bits` on a uniform per-group grid and stored as bit planes, most
significant first. The n-bit model reads the top n planes: its code is the max-bit code shifted right by
max_bits - n, so the n-bit codes are prefixes of the (n+1)-bit codes (nested, as in Any-Precision LLM,
Park et al. 2024), and storage is one max-bit model. An n-bit code c stands for the centre of the
2^(max_bits-n) max-bit levels it covers:
    w = (c + 1/2) * 2^k * s - z * s = (c - (z / 2^k - 1/2)) * (2^k * s),    k = max_bits - n,
i.e. an n-bit grid with scale 2^k·s and a half-integer zero point, which is why derived weights keep
float16 zero points.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from edgelm.compress.quant.modules import PackedWeight, QuantizedEmbedding, QuantizedLinear
from edgelm.compress.quant.primitives import QuantScheme, compute_params, pack, quantize, unpack
from edgelm.compress.recipe import Step, replace_module, target_modules
from edgelm.errors import RecipeError


class AnyPrecisionWeight(nn.Module):
    """Bit planes [max_bits, out, ceil(in/8)] of max-bit codes plus the max-bit grid's scales and zeros."""

    def __init__(self, out_features: int, in_features: int, max_bits: int, group_size: int):
        super().__init__()
        self.out_features, self.in_features = out_features, in_features
        self.max_bits, self.group_size = max_bits, group_size
        n_groups = in_features // group_size
        self.register_buffer("planes", torch.zeros(max_bits, out_features, -(-in_features // 8), dtype=torch.uint8))
        self.register_buffer("scales", torch.zeros(out_features, n_groups, dtype=torch.float16))
        self.register_buffer("zeros", torch.zeros(out_features, n_groups, dtype=torch.uint8))

    @classmethod
    def quantize(cls, weight: torch.Tensor, max_bits: int, group_size: int) -> AnyPrecisionWeight:
        w = weight.detach().float()
        scheme = QuantScheme(max_bits, group_size)
        scale, zero = compute_params(w, scheme)
        codes = quantize(w, scale, zero, scheme)
        out = cls(w.shape[0], w.shape[1], max_bits, group_size)
        for plane in range(max_bits):  # plane 0 holds the most significant bit
            bit = (codes >> (max_bits - 1 - plane)) & 1
            out.planes[plane].copy_(pack(bit, 1))
        out.scales.copy_(scale.half())
        out.zeros.copy_(zero.to(torch.uint8))
        return out

    def codes(self, bits: int) -> torch.Tensor:
        """n-bit codes from the top n planes (the nested prefix of the max-bit codes)."""
        codes = torch.zeros(self.out_features, self.in_features, dtype=torch.uint8)
        for plane in range(bits):
            codes = (codes << 1) | unpack(self.planes[plane], 1, self.in_features)
        return codes

    def at_bits(self, bits: int) -> PackedWeight:
        if not 1 <= bits <= self.max_bits:
            raise RecipeError(f"this any-precision model holds 1 to {self.max_bits} bits, not {bits}")
        shift = 2 ** (self.max_bits - bits)
        scale = self.scales.float() * shift
        zero = self.zeros.float() / shift - (0.5 if shift > 1 else 0.0)
        return PackedWeight.from_codes(self.codes(bits), scale, zero, QuantScheme(bits, self.group_size),
                                       zero_dtype=torch.float16)


class AnyPrecisionLinear(nn.Module):
    """Holds every precision; computes at `bits` (set with `set_bits`)."""

    def __init__(self, weight: AnyPrecisionWeight, bias: torch.Tensor | None, bits: int, embedding: bool = False):
        super().__init__()
        self.weight_ap = weight
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.embedding = embedding
        self.in_features, self.out_features = weight.in_features, weight.out_features
        self.register_load_state_dict_post_hook(self._after_load)
        if weight.planes.is_meta:  # a model directory being built: the planes arrive with load_state_dict
            self.bits = bits
        else:
            self.set_bits(bits)

    def set_bits(self, bits: int) -> None:
        packed = self.weight_ap.at_bits(bits)
        active = QuantizedEmbedding(packed) if self.embedding else QuantizedLinear(packed, self.bias)
        # Not a registered submodule: the derived n-bit weight is neither stored nor counted, the planes are.
        object.__setattr__(self, "active", active)
        self.bits = bits

    @property
    def weight(self) -> torch.Tensor:
        return self.active.weight

    @staticmethod
    def _after_load(module: AnyPrecisionLinear, incompatible_keys) -> None:
        module.set_bits(module.bits)  # derive the active precision once the planes (a child's) are loaded

    @property
    def storage_bytes(self) -> int:
        w = self.weight_ap
        return sum(t.numel() * t.element_size() for t in (w.planes, w.scales, w.zeros))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.active(x)


@dataclass(frozen=True)
class AnyPrecision(Step):
    name: ClassVar[str] = "anyprec"

    max_bits: int = 8
    min_bits: int = 3
    bits: int = 4  # the precision the model computes at after this step
    group_size: int = 64
    embedding: bool = True
    ignore: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not 2 <= self.min_bits <= self.bits <= self.max_bits <= 8:
            raise RecipeError(f"anyprec: need 2 <= min_bits <= bits <= max_bits <= 8, got min_bits={self.min_bits}, "
                              f"bits={self.bits}, max_bits={self.max_bits}")
        if self.group_size not in (16, 32, 64, 128, 256):
            raise RecipeError(f"anyprec: group_size must be 16, 32, 64, 128 or 256 (nested codes need groups), "
                              f"got {self.group_size}")

    def apply(self, model: nn.Module, calibration: Any = None) -> nn.Module:
        for name, module in target_modules(model, embedding=self.embedding, ignore=self.ignore):
            weight = AnyPrecisionWeight.quantize(module.weight, self.max_bits, self.group_size)
            replace_module(model, name, AnyPrecisionLinear(weight, getattr(module, "bias", None), self.bits,
                                                           embedding=isinstance(module, nn.Embedding)))
        return model


def set_precision(model: nn.Module, bits: int) -> None:
    """Switch every any-precision layer of the model to `bits`."""
    layers = [m for m in model.modules() if isinstance(m, AnyPrecisionLinear)]
    if not layers:
        raise RecipeError("the model has no any-precision layers; make it with the 'anyprec' method")
    for layer in layers:
        layer.set_bits(bits)
