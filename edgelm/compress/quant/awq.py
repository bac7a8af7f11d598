"""AWQ (Lin et al. 2023): activation-aware weight quantization by per-channel scaling, as in llm-awq/AutoAWQ.

A few input channels of a linear layer carry much larger activations than the rest; their weights matter
most, yet round-to-nearest gives them the same relative precision as every other weight in their group.
AWQ multiplies the input columns of W by s = mean|x|^α before quantizing (those weights then use more of
the grid) and divides the operation that produces x by s, so the float model is unchanged:

    y = x Wᵀ = (x / s)(W · diag(s))ᵀ,    x / s folded into the preceding RMSNorm weight or linear's rows.

α is picked per group of linears sharing an input (q/k/v, gate/up, down, o) from a grid in [0, 1) by the
output error on calibration inputs (α = 0 is plain RTN, so the search never does worse on its sample).
Then each output group's range is shrunk by the clip factor that minimizes its output error.

Sequential over blocks: block i is observed with the outputs of the already quantized blocks before it.
The math (`search_scale`, `search_clip`, `awq_quantize_weight`) is kept apart from the glue that walks the
model (`AWQ`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from edgelm.compress.calibration import BlockRunner, Calibration, capture_inputs
from edgelm.compress.quant.modules import PackedWeight
from edgelm.compress.quant.primitives import QuantScheme, compute_params, fake_quantize, grouped, quantize
from edgelm.compress.quant.rtn import QuantStep, rtn_quantize_weight, swap_in_quantized
from edgelm.compress.recipe import progress, target_modules
from edgelm.errors import RecipeError
from edgelm.models.base import RMSNorm

SEARCH_TOKENS = 2048  # calibration tokens (a random subsample) on which α is chosen
CLIP_FACTORS = tuple(1.0 - 0.05 * i for i in range(11))  # 1.0 down to 0.5
ROW_CHUNK = 8192  # rows per clipping search: bounds the working memory for a 262144-row embedding


# -- math --------------------------------------------------------------------------------------------------
def scales_for(act_mean: torch.Tensor, alpha: float) -> torch.Tensor:
    """s = mean|x|^α, normalized so that max(s)·min(s) = 1 (keeps the folded weights in a sane range)."""
    s = act_mean.float().clamp_min(1e-4).pow(alpha)
    return s / (s.max() * s.min()).sqrt()


def scaled_quantization_error(weight: torch.Tensor, x: torch.Tensor, s: torch.Tensor,
                              scheme: QuantScheme) -> float:
    """Mean squared output error ‖x Wᵀ - x (Q(W·diag(s)) / s)ᵀ‖² / numel on the inputs x [tokens, in]."""
    w = weight.float()
    delta = w - fake_quantize(w * s, scheme) / s
    return float((x @ delta.T).pow(2).mean())


def search_scale(weights: list[torch.Tensor], x: torch.Tensor, act_mean: torch.Tensor, scheme: QuantScheme,
                 n_grid: int = 20) -> torch.Tensor:
    """Per-input-channel scales s [in] for linears sharing the input x [tokens, in].

    The linears are searched together (their rows stacked: groups are per row, so stacking changes no
    quantization) because one s is folded into their common input.
    """
    w = torch.cat([weight.detach().float() for weight in weights])
    best_error, best_scale = float("inf"), torch.ones_like(act_mean, dtype=torch.float32)
    for step in range(n_grid):
        s = scales_for(act_mean, step / n_grid)
        error = scaled_quantization_error(w, x, s, scheme)
        if error < best_error:
            best_error, best_scale = error, s
    return best_scale


def group_grams(x: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """Xᵀ X restricted to each quantization group: [n_groups, gs, gs] for x [tokens, in].

    A group's output error (x_g · Δ_g)² summed over tokens is Δ_gᵀ (X_gᵀ X_g) Δ_g, so these small matrices
    replace the tokens in the clipping search (cost independent of the number of tokens)."""
    g = grouped(x.float(), group_size)  # [tokens, n_groups, gs]
    return torch.einsum("tgk,tgl->gkl", g, g)


def search_clip(weight: torch.Tensor, grams: torch.Tensor, scheme: QuantScheme,
                factors: tuple[float, ...] = CLIP_FACTORS) -> torch.Tensor:
    """Clip factors [out, n_groups]: per output group, the range shrink minimizing Δᵀ G Δ."""
    w = weight.detach().float()
    w_groups = grouped(w, scheme.group_size)
    best_error = torch.full(w_groups.shape[:2], float("inf"))
    best_clip = torch.ones(w_groups.shape[:2])
    for factor in factors:
        delta = grouped(fake_quantize(w, scheme, factor), scheme.group_size) - w_groups
        error = (torch.einsum("ogk,gkl->ogl", delta, grams) * delta).sum(-1)
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        best_clip[better] = factor
    return best_clip


def awq_quantize_weight(weight: torch.Tensor, scheme: QuantScheme, grams: torch.Tensor | None = None,
                        row_chunk: int = ROW_CHUNK) -> PackedWeight:
    """Codes of W with each group's range clipped as the search on `grams` says (none: plain RTN)."""
    if grams is None:
        return rtn_quantize_weight(weight, scheme)
    w = weight.detach().float()
    codes, scales, zeros = [], [], []
    for rows in w.split(row_chunk):
        scale, zero = compute_params(rows, scheme, search_clip(rows, grams, scheme))
        codes.append(quantize(rows, scale, zero, scheme))
        scales.append(scale)
        zeros.append(zero)
    return PackedWeight.from_codes(torch.cat(codes), torch.cat(scales), torch.cat(zeros), scheme)


# -- glue: what AWQ observes and where it folds ------------------------------------------------------------
class InputStats:
    """What AWQ needs of one input over the calibration tokens: mean |x| per channel, a random subsample
    of tokens (the scale search) and the per-group Gram matrices (the clipping search)."""

    def __init__(self, n_features: int, group_size: int | None, keep_fraction: float, seed: int = 0):
        self.abs_sum = torch.zeros(n_features, dtype=torch.float64)
        self.n_tokens = 0
        gs = group_size or n_features
        self.group_size = group_size
        self.grams = torch.zeros(n_features // gs, gs, gs, dtype=torch.float64)
        self.keep_fraction = keep_fraction
        self.generator = torch.Generator().manual_seed(seed)
        self.samples: list[torch.Tensor] = []

    def observe(self, x: torch.Tensor) -> None:
        x = x.float()
        self.abs_sum += x.abs().sum(0).double()
        self.n_tokens += x.shape[0]
        self.grams += group_grams(x, self.group_size).double()
        keep = torch.rand(x.shape[0], generator=self.generator) < self.keep_fraction
        self.samples.append(x[keep].clone())

    @property
    def mean_abs(self) -> torch.Tensor:
        return (self.abs_sum / max(self.n_tokens, 1)).float()

    @property
    def sample(self) -> torch.Tensor:
        return torch.cat(self.samples)

    def gram_matrices(self) -> torch.Tensor:
        return self.grams.float()

    def divide_by(self, s: torch.Tensor) -> None:
        """The input became x / s (after a fold): update every statistic to match. Out of place: the
        tensors may have been created under inference mode."""
        s64 = s.double()
        self.abs_sum = self.abs_sum / s64
        g = grouped(s64[None], self.group_size)[0]  # [n_groups, gs]
        self.grams = self.grams / (g[:, :, None] * g[:, None, :])
        self.samples = [self.sample / s]


@dataclass(frozen=True)
class ScalingGroup:
    """Linears (names inside the block) that share one input, produced by `previous` (None: not foldable,
    the linears are only quantized)."""

    linears: tuple[str, ...]
    previous: str | None


def scaling_groups(block: nn.Module) -> list[ScalingGroup]:
    attn = block.attn
    # wv's output rows map one to one onto wo's inputs only without grouped-query attention (AutoAWQ's rule).
    wo_previous = "attn.wv" if attn.n_kv_heads == attn.n_heads else None
    return [
        ScalingGroup(("attn.wq", "attn.wk", "attn.wv"), "attn_norm"),
        ScalingGroup(("attn.wo",), wo_previous),
        ScalingGroup(("ffn.w_gate", "ffn.w_up"), "ffn_norm"),
        ScalingGroup(("ffn.w_down",), "ffn.w_up"),  # down(act(gate) * up): up's rows scale its input
    ]


@torch.no_grad()
def fold_scales(previous: nn.Module, linears: list[nn.Linear], s: torch.Tensor) -> None:
    """W·diag(s) in the linears and the inverse in the op producing their input: exact in float."""
    for linear in linears:
        linear.weight.mul_(s.to(linear.weight.dtype))
    if isinstance(previous, RMSNorm):
        previous.weight.div_(s.to(previous.weight.dtype))
    else:
        previous.weight.div_(s.to(previous.weight.dtype)[:, None])
        if previous.bias is not None:
            previous.bias.div_(s.to(previous.bias.dtype))


def fold_into_reference(model: nn.Module, previous: str, linears: list[str], s: torch.Tensor) -> None:
    """Fold the same scales into compress()'s reference model, where there is one, so that it stays in the
    quantized model's basis: a later step comparing weights (LoRC's W − Q(W)) must see W·diag(s), not W.
    Folding is exact in float, so the reference (a distillation teacher) computes the same function."""
    reference = getattr(model, "compression_reference", None)
    if reference is None:
        return
    try:
        ref_previous = reference.get_submodule(previous)
        ref_linears = [reference.get_submodule(name) for name in linears]
    except AttributeError:  # a teacher of another shape: nothing there to keep in step
        return
    if _foldable(ref_previous, ref_linears) and all(
            ref.weight.shape == model.get_submodule(name).weight.shape for ref, name in zip(ref_linears, linears)):
        fold_scales(ref_previous, ref_linears, s)


def _foldable(previous: nn.Module | None, linears: list[nn.Module]) -> bool:
    """Scales fold only into float modules (a layer quantized by an earlier step has no weight to scale)."""
    return (isinstance(previous, (RMSNorm, nn.Linear))
            and all(isinstance(linear, nn.Linear) for linear in linears))


@dataclass(frozen=True)
class AWQ(QuantStep):
    name: ClassVar[str] = "awq"
    needs_calibration: ClassVar[bool] = True
    changes_reference: ClassVar[bool] = True  # its scales are folded into the reference too (LoRC's basis)

    n_grid: int = 20  # α values searched in [0, 1)
    clip_search: bool = True  # shrink each group's range where that lowers its output error
    batch_size: int = 4  # calibration samples per forward

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.n_grid <= 0:
            raise RecipeError(f"awq: n_grid must be positive, got {self.n_grid!r}")
        if self.batch_size <= 0:
            raise RecipeError(f"awq: batch_size must be positive, got {self.batch_size!r}")

    def apply(self, model: nn.Module, calibration: Any = None) -> nn.Module:
        if calibration is None:
            raise RecipeError("awq needs calibration data: pass a text file (--calib FILE) or use data-free "
                              "calibration sampled from the model itself")
        self._walk(model, calibration, quantize_weights=True)
        return model

    def search_and_fold(self, model: nn.Module, calibration: Calibration) -> nn.Module:
        """Only the scale search and fold, weights left in float: the model computes the same function."""
        self._walk(model, calibration, quantize_weights=False)
        return model

    # -- walking the model --------------------------------------------------------------------------------
    def _walk(self, model: nn.Module, calibration: Calibration, quantize_weights: bool) -> None:
        # Module identity -> its name in the model, for everything to quantize.
        targets = {id(m): name for name, m in target_modules(model, embedding=self.embedding, ignore=self.ignore)}
        keep_fraction = min(1.0, SEARCH_TOKENS / max(calibration.tokens.numel(), 1))
        runner = BlockRunner(model, calibration, batch_size=self.batch_size)
        for i, block in enumerate(progress(model.layers, "awq", "block")):
            groups = scaling_groups(block)
            stats = self._observe_block(runner, i, block, groups, keep_fraction)
            for group in groups:
                self._scale_group(model, f"layers.{i}.", group, stats[group.linears[0]], targets)
            if quantize_weights:
                for group in groups:
                    for name in group.linears:
                        self._quantize_linear(model, block.get_submodule(name), name, stats[group.linears[0]],
                                              targets)
            del stats
            runner.advance(i)  # the next block sees this (quantized) block's outputs
        self._head(model, runner, targets, keep_fraction, quantize_weights)

    def _observe_block(self, runner: BlockRunner, i: int, block: nn.Module, groups: list[ScalingGroup],
                       keep_fraction: float) -> dict[str, InputStats]:
        # The first linear of a group sees the group's input: one hook per group, not per linear.
        observed = {group.linears[0]: block.get_submodule(group.linears[0]) for group in groups}
        stats = {name: InputStats(_in_features(module), self.group_size, keep_fraction, seed=i)
                 for name, module in observed.items()}
        with capture_inputs(observed, lambda name, x: stats[name].observe(x)):
            runner.run(i)
        return stats

    def _scale_group(self, model: nn.Module, prefix: str, group: ScalingGroup, stats: InputStats,
                     targets: dict[int, str]) -> None:
        block = model.get_submodule(prefix.rstrip("."))
        linears = [block.get_submodule(name) for name in group.linears]
        previous = block.get_submodule(group.previous) if group.previous else None
        to_quantize = [linear.weight for linear in linears if id(linear) in targets]
        if not to_quantize or not _foldable(previous, linears):
            return
        s = search_scale(to_quantize, stats.sample, stats.mean_abs, self.scheme, self.n_grid)
        fold_scales(previous, linears, s)
        fold_into_reference(model, prefix + group.previous, [prefix + name for name in group.linears], s)
        stats.divide_by(s)

    def _quantize_linear(self, model: nn.Module, module: nn.Module, name: str, stats: InputStats,
                         targets: dict[int, str]) -> None:
        if id(module) not in targets:
            return
        # Like AutoAWQ, q and k keep their full range: their output error says little about the attention
        # scores they form together.
        clip = self.clip_search and name not in ("attn.wq", "attn.wk")
        packed = awq_quantize_weight(module.weight, self.scheme, stats.gram_matrices() if clip else None)
        swap_in_quantized(model, targets[id(module)], module, packed)

    def _head(self, model: nn.Module, runner: BlockRunner, targets: dict[int, str], keep_fraction: float,
              quantize_weights: bool) -> None:
        """The output matrix sees the final normed hidden states. A separate head gets AWQ scaling folded
        into the final norm; a tied embedding cannot (the same matrix is the lookup table), so it gets RTN
        with the clipping search on the head's inputs. A separate embedding has lookups only: its clipping
        minimizes the weight error itself."""
        final = runner.final_hidden()
        stats = InputStats(final.shape[-1], self.group_size, keep_fraction, seed=len(model.layers))
        for batch in final.split(self.batch_size):
            stats.observe(batch.reshape(-1, batch.shape[-1]))
        del final
        tied = model.output is None
        head = model.tok_embeddings if tied else model.output
        if not tied and id(head) in targets and _foldable(model.norm, [head]):
            s = search_scale([head.weight], stats.sample, stats.mean_abs, self.scheme, self.n_grid)
            fold_scales(model.norm, [head], s)
            fold_into_reference(model, "norm", [targets[id(head)]], s)
            stats.divide_by(s)
        if not quantize_weights:
            return
        if id(head) in targets:
            grams = stats.gram_matrices() if self.clip_search else None
            swap_in_quantized(model, targets[id(head)], head, awq_quantize_weight(head.weight, self.scheme, grams))
        embedding = model.tok_embeddings
        if not tied and id(embedding) in targets:
            n_groups, gs = stats.grams.shape[0], stats.grams.shape[-1]
            identity = torch.eye(gs).expand(n_groups, gs, gs) if self.clip_search else None
            swap_in_quantized(model, targets[id(embedding)], embedding,
                              awq_quantize_weight(embedding.weight, self.scheme, identity))


def _in_features(module: nn.Module) -> int:
    return module.in_features if hasattr(module, "in_features") else module.weight.shape[1]
