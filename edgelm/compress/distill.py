"""White-box distillation of a quantized model: train its quantization scales on KL(teacher ‖ student).

As MLX-LM's DWQ does: the integer codes stay fixed; each group's scale gets a trainable gain, optimised
with Adam on the KL divergence between the uncompressed model's next-token distribution (teacher) and the
quantized model's (student) over calibration text. The trained scales are written back as fp16, so the
result is an ordinary quantized model of the same size.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from edgelm.compress.quant.modules import QuantizedEmbedding, QuantizedLinear
from edgelm.compress.recipe import Step, reference_model
from edgelm.errors import RecipeError


@dataclass(frozen=True)
class DistillScales(Step):
    name: ClassVar[str] = "distill"
    needs_calibration: ClassVar[bool] = True
    needs_reference: ClassVar[bool] = True

    steps: int = 100
    lr: float = 1e-3  # on the relative gain of each scale
    batch_size: int = 2
    seq_len: int = 256
    embedding: bool = False  # the tied embedding is also the lookup table; its scales are left alone by default

    def __post_init__(self) -> None:
        if self.steps < 1 or self.lr <= 0 or self.batch_size < 1 or self.seq_len < 2:
            raise RecipeError("distill: steps, batch_size must be >= 1, seq_len >= 2 and lr > 0")

    def apply(self, model: nn.Module, calibration: Any = None) -> nn.Module:
        if calibration is None:
            raise RecipeError("distill needs calibration text (--calib FILE, or data-free samples)")
        teacher = reference_model(model, "distill")
        tokens = calibration.tokens[:, : self.seq_len]
        modules = [m for m in model.modules()
                   if isinstance(m, QuantizedLinear) or (self.embedding and isinstance(m, QuantizedEmbedding))]
        if not modules:
            raise RecipeError("distill trains quantization scales: put it after a quantization step, e.g. [rtn, distill]")
        generator = torch.Generator().manual_seed(0)
        with trainable_scales(modules) as gains:
            optimizer = torch.optim.Adam(gains, lr=self.lr)
            progress = _progress(self.steps)
            for _ in range(self.steps):
                rows = torch.randint(0, tokens.shape[0], (self.batch_size,), generator=generator)
                batch = tokens[rows]
                with torch.no_grad():
                    target = F.log_softmax(teacher(batch).float(), dim=-1)
                loss = kl_divergence(target, F.log_softmax(model(batch).float(), dim=-1))
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                progress.set_postfix(kl=f"{loss.item():.4f}")
                progress.update(1)
            progress.close()
        return model


def kl_divergence(teacher_logp: torch.Tensor, student_logp: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(teacher ‖ student)."""
    return (teacher_logp.exp() * (teacher_logp - student_logp)).sum(-1).mean()


@contextmanager
def trainable_scales(modules: list[nn.Module]) -> Iterator[list[nn.Parameter]]:
    """Give each quantized module a trainable per-group gain on its scales; fold it into them on exit."""
    gains = []
    for module in modules:
        module.weight_q.scale_gain = nn.Parameter(torch.ones_like(module.weight_q.scales, dtype=torch.float32))
        gains.append(module.weight_q.scale_gain)
    try:
        with torch.enable_grad():
            yield gains
    finally:
        for module, gain in zip(modules, gains):
            weight = module.weight_q
            weight.scale_gain = None
            weight.scales.copy_((weight.scales.float() * gain.detach()).half())


def _progress(total: int):
    from tqdm import tqdm

    return tqdm(total=total, desc="distill", unit="step", file=sys.stderr)
