"""Training-based compression against the uncompressed model (teacher), on the CPU at small budgets.

- DistillScales (white-box KD, as MLX-LM's DWQ): the integer codes stay fixed; each group's scale gets a
  trainable gain, optimised with Adam on KL(teacher ‖ student) of the next-token distributions over
  calibration text. The trained scales are written back as fp16: an ordinary quantized model, same size.
- DistillWeights: plain white-box KD of the float weights on the same objective (after structured pruning).
- QAT: the float weights are trained through fake quantization (straight-through estimator) on the same
  KL objective, then quantized to the packed format with the same scheme.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from edgelm.compress.quant.modules import PackedWeight, QuantizedEmbedding, QuantizedLinear
from edgelm.compress.quant.primitives import fake_quantize
from edgelm.compress.quant.rtn import QuantStep, rtn_quantize_weight, swap_in_quantized
from edgelm.compress.recipe import Step, progress, reference_model, target_modules
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

    def check(self, model: nn.Module) -> None:
        require_scales(self._trained(model), self.name)

    def _trained(self, model: nn.Module) -> list[nn.Module]:
        return [m for m in model.modules()
                if isinstance(m, QuantizedLinear) or (self.embedding and isinstance(m, QuantizedEmbedding))]

    def apply(self, model: nn.Module, calibration: Any = None) -> nn.Module:
        if calibration is None:
            raise RecipeError("distill needs calibration text (--calib FILE, or data-free samples)")
        teacher = reference_model(model, "distill")
        tokens = calibration.tokens[:, : self.seq_len]
        modules = self._trained(model)
        with on_training_device(model, teacher, "distill"), trainable_scales(modules) as gains:
            train(gains, tokens, self.steps, self.lr, self.batch_size, "distill",
                  lambda batch: kl_divergence(teacher_logp(teacher, batch), F.log_softmax(model(batch).float(), -1)))
        return model


@dataclass(frozen=True)
class QAT(QuantStep):
    """Quantization-aware training of the transformer blocks' linear layers, then RTN to packed codes."""

    name: ClassVar[str] = "qat"
    needs_calibration: ClassVar[bool] = True
    needs_reference: ClassVar[bool] = True

    steps: int = 50
    lr: float = 1e-5
    batch_size: int = 2
    seq_len: int = 256

    def apply(self, model: nn.Module, calibration: Any = None) -> nn.Module:
        if calibration is None:
            raise RecipeError("qat needs calibration text (--calib FILE, or data-free samples)")
        teacher = reference_model(model, "qat")
        # The embedding is also the lookup table: it is quantized (RTN) but not trained here.
        linears = [(name, m) for name, m in target_modules(model, embedding=False, ignore=self.ignore)
                   if name.startswith("layers.")]
        if not linears:
            raise RecipeError("qat found no float linear layers to train; put it before other quantizers")
        tokens = calibration.tokens[:, : self.seq_len]
        with on_training_device(model, teacher, "qat"):
            for _, module in linears:
                parametrize.register_parametrization(module, "weight", FakeQuantize(self.scheme))
            weights = [module.parametrizations.weight.original for _, module in linears]
            frozen = [p for p in model.parameters() if all(p is not w for w in weights)]
            for p in frozen:
                p.requires_grad_(False)
            try:
                train(weights, tokens, self.steps, self.lr, self.batch_size, "qat",
                      lambda batch: kl_divergence(teacher_logp(teacher, batch),
                                                  F.log_softmax(model(batch).float(), -1)))
            finally:
                for _, module in linears:
                    parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
                for p in frozen:
                    p.requires_grad_(True)
        # Convert to the packed format: the trained float weights, quantized with the trained-for scheme.
        for name, module in linears:
            swap_in_quantized(model, name, module, rtn_quantize_weight(module.weight, self.scheme))
        if self.embedding:
            embedding = model.tok_embeddings
            swap_in_quantized(model, "tok_embeddings", embedding, rtn_quantize_weight(embedding.weight, self.scheme))
        return model


@dataclass(frozen=True)
class DistillWeights(Step):
    """White-box KD of the float weights: every linear layer of the blocks (and the norms) trained on
    KL(teacher ‖ student). The recovery step after structured pruning; the embedding stays frozen."""

    name: ClassVar[str] = "distill_weights"
    needs_calibration: ClassVar[bool] = True
    needs_reference: ClassVar[bool] = True

    steps: int = 100
    lr: float = 2e-5
    batch_size: int = 2
    seq_len: int = 256

    def __post_init__(self) -> None:
        if self.steps < 1 or self.lr <= 0 or self.batch_size < 1 or self.seq_len < 2:
            raise RecipeError("distill_weights: steps, batch_size must be >= 1, seq_len >= 2 and lr > 0")

    def apply(self, model: nn.Module, calibration: Any = None) -> nn.Module:
        if calibration is None:
            raise RecipeError("distill_weights needs calibration text (--calib FILE, or data-free samples)")
        teacher = reference_model(model, "distill_weights")
        trained = [p for p in model.layers.parameters() if p.dtype.is_floating_point]
        if not trained:
            raise RecipeError("distill_weights found no float weights in the blocks; put it before quantization")
        frozen = [p for p in model.parameters() if all(p is not t for t in trained)]
        for p in frozen:
            p.requires_grad_(False)
        try:
            # Moving keeps the Parameter objects, so the lists above stay valid.
            with on_training_device(model, teacher, "distill_weights"):
                train(trained, calibration.tokens[:, : self.seq_len], self.steps, self.lr, self.batch_size,
                      "distill_weights", lambda batch: kl_divergence(teacher_logp(teacher, batch),
                                                                     F.log_softmax(model(batch).float(), -1)))
        finally:
            for p in frozen:
                p.requires_grad_(True)
        return model


class FakeQuantize(nn.Module):
    """W -> Q(W) in the forward pass, identity in the backward pass (straight-through estimator)."""

    def __init__(self, scheme):
        super().__init__()
        self.scheme = scheme

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + (fake_quantize(weight.detach(), self.scheme) - weight).detach()


@dataclass(frozen=True)
class BlackBoxDistill(Step):
    """Black-box KD: the teacher writes text (continuations of calibration prompts); the quantized student's
    scales are fine-tuned on that text with next-token cross-entropy — only the text, never the logits."""

    name: ClassVar[str] = "distill_blackbox"
    needs_calibration: ClassVar[bool] = True
    needs_reference: ClassVar[bool] = True

    samples: int = 16
    prompt_tokens: int = 16
    seq_len: int = 128
    temperature: float = 0.8
    steps: int = 100
    lr: float = 1e-3
    batch_size: int = 2

    def __post_init__(self) -> None:
        if self.samples < 1 or self.steps < 1 or self.lr <= 0 or not 1 <= self.prompt_tokens < self.seq_len:
            raise RecipeError("distill_blackbox: samples, steps >= 1, lr > 0 and 1 <= prompt_tokens < seq_len")

    def check(self, model: nn.Module) -> None:
        require_scales([m for m in model.modules() if isinstance(m, QuantizedLinear)], self.name)

    def apply(self, model: nn.Module, calibration: Any = None) -> nn.Module:
        from edgelm.runtime.generate import generate_step
        from edgelm.runtime.sampling import Sampler, SamplingParams

        if calibration is None:
            raise RecipeError("distill_blackbox needs calibration prompts (--calib FILE, or data-free samples)")
        teacher = reference_model(model, "distill_blackbox")
        modules = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
        texts = []
        for i, row in enumerate(calibration.tokens[: self.samples]):
            prompt = row[: self.prompt_tokens].tolist()
            sampler = Sampler(SamplingParams(temperature=self.temperature, top_k=0, top_p=1.0, min_p=0.0, seed=i))
            texts.append(prompt + list(generate_step(teacher, prompt, sampler, self.seq_len - len(prompt))))
        tokens = torch.tensor(texts, dtype=torch.long)

        def next_token_loss(batch: torch.Tensor) -> torch.Tensor:
            logits = model(batch[:, :-1]).float()
            return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))

        # The teacher writes on the CPU (the compiled decode step); only the training loop moves.
        with on_training_device(model, teacher, "distill_blackbox"), trainable_scales(modules) as gains:
            train(gains, tokens, self.steps, self.lr, self.batch_size, "distill_blackbox", next_token_loss)
        return model


def require_scales(modules: list[nn.Module], step: str) -> None:
    if not modules:
        raise RecipeError(f"the model has no quantized layers, and {step} trains their scales: put it after a "
                          f"quantization step (e.g. [rtn, {step}]) or quantize the model first "
                          "(edgelm quantize ... -o DIR); distill_weights trains float weights instead")


@contextmanager
def on_training_device(model: nn.Module, teacher: nn.Module, step: str) -> Iterator[None]:
    """Student and teacher on compress()'s `device` (e.g. a GPU) for a training loop, back on the CPU after.
    Nothing moves on the CPU. Only float models move: packed layers decode and compute on the CPU."""
    device = model.__dict__.get("compression_device")
    if device is None or torch.device(device).type == "cpu":
        yield
        return
    packed = [name for net in (model, teacher) for name, m in net.named_modules()
              if isinstance(m, (QuantizedLinear, QuantizedEmbedding)) or hasattr(m, "weight_ap")]
    if packed:
        raise RecipeError(f"{step} on {device}: {len(packed)} layers (e.g. {packed[0]}) are packed, and packed "
                          "layers compute on the CPU only; run it with --device cpu (on a GPU train float "
                          "layers: distill_weights, qat)")
    try:
        model.to(device)
        teacher.to(device)
        yield
    finally:
        model.to("cpu")
        teacher.to("cpu")
        for module in (model, teacher):
            if hasattr(module, "clear_caches"):
                module.clear_caches()


def train(params: list[nn.Parameter], tokens: torch.Tensor, steps: int, lr: float, batch_size: int, desc: str,
          loss_of: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Adam on `params` over random batches of token rows (moved to the params' device), with a progress bar
    showing the loss."""
    generator = torch.Generator().manual_seed(0)
    optimizer = torch.optim.Adam(params, lr=lr)
    device = params[0].device
    with torch.enable_grad(), progress(range(steps), desc, "step") as bar:
        for _ in bar:
            batch = tokens[torch.randint(0, tokens.shape[0], (batch_size,), generator=generator)].to(device)
            loss = loss_of(batch)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            bar.set_postfix(loss=f"{loss.item():.4f}")


@torch.no_grad()
def teacher_logp(teacher: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    return F.log_softmax(teacher(batch).float(), dim=-1)


def kl_divergence(teacher_logp: torch.Tensor, student_logp: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(teacher ‖ student)."""
    return (teacher_logp.exp() * (teacher_logp - student_logp)).sum(-1).mean()


@contextmanager
def trainable_scales(modules: list[nn.Module]) -> Iterator[list[nn.Parameter]]:
    """Give each quantized module a trainable per-group gain on its scales (every row tier of a tiered
    weight its own); fold them into the scales on exit."""
    weights = [w for module in modules for w in module.weight_q.modules() if isinstance(w, PackedWeight)]
    gains = []
    for weight in weights:
        weight.scale_gain = nn.Parameter(torch.ones_like(weight.scales, dtype=torch.float32))
        gains.append(weight.scale_gain)
    try:
        with torch.enable_grad():
            yield gains
    finally:
        for weight, gain in zip(weights, gains):
            weight.scale_gain = None
            weight.scales.copy_((weight.scales.float() * gain.detach()).half())
