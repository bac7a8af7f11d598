"""Round-to-nearest quantization: each group's range from its min/max (or absmax), no data needed."""

from __future__ import annotations

import torch

from edgelm.compress.quant.modules import PackedWeight
from edgelm.compress.quant.primitives import QuantScheme, compute_params, quantize


def rtn_quantize_weight(weight: torch.Tensor, scheme: QuantScheme) -> PackedWeight:
    w = weight.detach().float()
    scale, zero = compute_params(w, scheme)
    return PackedWeight.from_codes(quantize(w, scale, zero, scheme), scale, zero, scheme)
