"""Mixed precision to a budget: bits (and group size) per tensor so the whole model meets a target bpw.

For every quantizable tensor and every candidate format (bits, group size) we estimate the damage to the
model's output distribution and the exact storage cost in bytes. Damage = the KL divergence the model's
next-token distribution suffers when only that tensor is quantized at a reference format (3 bits),
measured on calibration text, scaled to other formats by the ratio of activation-weighted squared errors
Σ_ij (W_ij − Q(W)_ij)² · E[x_j²] (E[x_j²] is the diagonal of the layer's Hessian): KL grows with the
noise power for small noise, and one forward pass per tensor stays affordable on a CPU. (Raw weighted
errors are not comparable between layers: norms after each block rescale them.) Choosing one format per
tensor to minimise total damage under a byte budget is a multiple-choice knapsack; a Lagrangian relaxation
(pick argmin damage + λ·bytes per tensor, bisect λ) finds the frontier, then leftover budget is spent on
the upgrades with the best damage saved per byte. The budget counts everything model_size counts
(embedding, norms, biases), so the resulting model's bits per weight is at most the target.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, fields, replace
from typing import Any, ClassVar

import torch
from torch import nn

from edgelm.compress.calibration import BlockRunner, capture_inputs
from edgelm.compress.quant.gptq import gptq_model, quantize_rows
from edgelm.compress.quant.modules import LowRankRows, PackedWeight
from edgelm.compress.quant.primitives import LowRankFormat, QuantScheme, fake_quantize
from edgelm.compress.quant.rtn import rtn_quantize_weight, swap_in_quantized
from edgelm.compress.quant.source import SourceGrids
from edgelm.compress.recipe import Step, progress, target_modules
from edgelm.errors import RecipeError

# (bits, group size, fitted grid). 1-bit rows are for the rarest tiers of the embedding: at ~3 bpw and below,
# every bit they do not take goes to the linear layers. Fitted grids (least-squares scale and fp16 zero
# point, primitives.fitted_params) cost 8 more bits per group and halve the error of a 1- or 2-bit grid.
_GRIDS = ((1, 64), (1, 128), (2, 32), (2, 64), (2, 128), (2, 256), (3, 32), (3, 64), (3, 128), (3, 256),
          (4, 32), (4, 64), (4, 128), (4, 256), (5, 32), (5, 64), (6, 32), (6, 64))
DEFAULT_FORMATS = (tuple((bits, group, False) for bits, group in _GRIDS) + ((8, 32, False), (8, 64, False))
                   + tuple((bits, group, True) for bits, group in _GRIDS))
# Row tiers of the embedding may also be low-rank (modules.LowRankRows): 0.15-0.45 bit per weight.
DEFAULT_LOW_RANK = (LowRankFormat(16, 4), LowRankFormat(32, 4), LowRankFormat(64, 4))


@dataclass(frozen=True)
class Candidate:
    bits: int
    group_size: int
    damage: float
    nbytes: int
    source: bool = False  # the source file's own grid (exact: no damage)
    fit: bool = False  # a fitted grid (fractional zero points)
    low_rank: LowRankFormat | None = None  # rows as coefficients over a basis (embedding tiers only)

    @property
    def label(self) -> str:
        if self.low_rank is not None:
            return f"lr:{self.low_rank.rank}:{self.low_rank.bits}"
        return "source" if self.source else f"{self.bits}:{self.group_size}" + (":fit" if self.fit else "")

    def scaled(self, factor: float) -> Candidate:
        return replace(self, damage=self.damage * factor)


@dataclass(frozen=True)
class MixedPrecision(Step):
    name: ClassVar[str] = "mixed"
    needs_calibration: ClassVar[bool] = True

    target_bpw: float = 4.5
    # "bits:group[:fit]" choices, e.g. ("3:64", "2:64:fit"), and for embedding tiers "lr:rank:bits" (low-rank,
    # e.g. "lr:16:4"); empty = defaults
    formats: tuple[str, ...] = ()
    method: str = "gptq"  # the quantizer that applies the chosen formats: "gptq" (data-aware) or "rtn"
    keep_source: bool = True  # also offer each tensor's grid from the source file (already quantized GGUFs)
    # Row tiers of the token embedding, by importance on the calibration text: the top 1024 rows, the next
    # up to 4096, ... each tier gets its own format. Empty: the embedding is one tensor.
    embedding_tiers: tuple[int, ...] = (1024, 4096, 16384, 32768, 65536, 131072)
    # Text unlike the calibration text puts more of its probability mass on rarer tokens. A tier's measured
    # damage is scaled by its share of mass under a prior, (1 - unseen_mass) x its share on calibration text
    # + unseen_mass x its share under Zipf's law over the importance ranking, over its calibration share.
    # Without it the rarest tiers look free (they barely occur in any calibration sample) and are starved.
    unseen_mass: float = 0.1
    # Low-rank and 1-bit formats only for tiers that get less than this share of the calibration text's
    # probability mass: such rows lose what sets their token apart, a loss that shows when the token is the
    # one to predict, which calibration text measures only for tokens it predicts.
    low_rank_below: float = 1e-4
    ignore: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not 2.0 <= self.target_bpw <= 16.0:
            raise RecipeError(f"mixed: target_bpw must be between 2 and 16, got {self.target_bpw}")
        if self.method not in ("gptq", "rtn"):
            raise RecipeError(f"mixed: method must be 'gptq' or 'rtn', got {self.method!r}")
        if not 0.0 <= self.unseen_mass < 1.0:
            raise RecipeError(f"mixed: unseen_mass must be in [0, 1), got {self.unseen_mass}")
        if not 0.0 <= self.low_rank_below <= 1.0:
            raise RecipeError(f"mixed: low_rank_below must be in [0, 1], got {self.low_rank_below}")
        self.candidate_formats()  # validates

    def candidate_formats(self) -> tuple[tuple[tuple[int, int, bool], ...], tuple[LowRankFormat, ...]]:
        """The grids (bits, group size, fitted) and the low-rank formats to choose from."""
        if not self.formats:
            return DEFAULT_FORMATS, DEFAULT_LOW_RANK
        grids, low_rank = [], []
        for text in self.formats:
            fields = text.split(":")
            try:
                if fields[0] == "lr" and len(fields) == 3:
                    low_rank.append(LowRankFormat(int(fields[1]), int(fields[2])))
                    continue
                if len(fields) not in (2, 3) or fields[2:] not in ([], ["fit"]):
                    raise ValueError
                bits, group, fit = int(fields[0]), int(fields[1]), len(fields) == 3
                QuantScheme(bits, group, fit=fit)
            except ValueError:
                raise RecipeError(f"mixed: format '{text}' must be 'bits:group_size', 'bits:group_size:fit' or "
                                  "'lr:rank:bits', such as '4:64', '2:64:fit' or 'lr:16:4'") from None
            grids.append((bits, group, fit))
        if not grids:
            raise RecipeError("mixed: formats need at least one 'bits:group_size' grid (low-rank formats only "
                              "serve embedding tiers)")
        return tuple(grids), tuple(low_rank)

    def apply(self, model: nn.Module, calibration: Any = None) -> nn.Module:
        modules = dict(target_modules(model, embedding=True, ignore=self.ignore))
        weights = {name: m.weight.detach().float() for name, m in modules.items()}
        slots, measured, head_hessian = self.analyze(model, modules, weights, calibration)
        options = {key: list(opts) for key, opts in measured.items()}
        kept: dict[str, PackedWeight] = {}  # slot -> the source file's grid of its rows
        if self.keep_source:
            grids = SourceGrids(model)
            for name, module in modules.items():
                packed = grids.weight(name, module)
                if packed is None:
                    continue
                for key, slot in slots.items():
                    if slot.module == name:
                        kept[key] = packed if slot.rows is None else packed.select_rows(slot.rows)
                        options[key].append(Candidate(packed.scheme.bits, packed.scheme.group_size, 0.0,
                                                      kept[key].storage_bytes, source=True))
        fixed = fixed_bytes(model, modules) + sum(  # a tiered weight also stores its row -> tier map
            weights[name].shape[0] for name in {s.module for s in slots.values() if s.rows is not None})
        n_weights = sum(p.numel() for p in model.parameters())
        budget = int(self.target_bpw * n_weights / 8) - fixed
        choice = allocate(options, budget)
        if choice is None:
            smallest = (fixed + sum(min(c.nbytes for c in opts) for opts in options.values())) * 8 / n_weights
            raise RecipeError(f"mixed: target_bpw {self.target_bpw} is below the smallest model these formats "
                              f"can make ({smallest:.3f} bpw); raise it or add lower-bit formats")

        def how(key: str) -> QuantScheme | PackedWeight | LowRankFormat:
            pick = choice[key]
            if pick.low_rank is not None:
                return pick.low_rank
            return kept[key] if pick.source else QuantScheme(pick.bits, pick.group_size, fit=pick.fit)

        plans: dict[str, Any] = {}  # module -> a scheme, a source grid, or a row-tier plan
        for key, slot in slots.items():
            if slot.rows is None:
                plans[slot.module] = how(key)
            else:
                plans.setdefault(slot.module, []).append((slot.rows, how(key)))
        for name, plan in list(plans.items()):
            if isinstance(plan, PackedWeight):
                swap_in_quantized(model, name, modules[name], plan)
                del plans[name]
        if self.method == "gptq" and calibration is not None:
            gptq_model(model, calibration, plans)
        else:
            for name, plan in plans.items():
                swap_in_quantized(model, name, modules[name],
                                  quantize_rows(weights[name], plan, rtn_quantize_weight, hessian=head_hessian))
        model.mixed_precision_plan = {key: c.label for key, c in choice.items()}
        return model

    def analyze(self, model: nn.Module, modules: dict[str, nn.Module], weights: dict[str, torch.Tensor],
                calibration) -> tuple[dict[str, Slot], dict[str, list[Candidate]], torch.Tensor | None]:
        """The allocation units, every candidate format's damage and bytes for each, and the output's
        Hessian: all that does not depend on the budget. The last analysis is kept, keyed by the model's
        state, the calibration tokens and every setting but `target_bpw` and `method`, so compressing the
        same model to several budgets (a ladder, a device search) measures the model once."""
        global _last_analysis
        key = self._analysis_key(model, calibration)
        if _last_analysis is not None and _last_analysis[0] == key:
            return _last_analysis[1]
        _last_analysis = None  # free the old one before measuring
        channel_power, head_inputs = input_channel_power(model, modules, calibration)
        slots = self.slots(model, modules, head_inputs, calibration)
        formats, low_rank = self.candidate_formats()
        tiers = {key: slot for key, slot in slots.items() if slot.rows is not None}
        plain = [key for key in slots if key not in tiers]
        options = {key: candidates(slots[key].weight(weights), channel_power.get(slots[key].module), formats)
                   for key in progress(plain, "error per format", "tensor")}
        if calibration is not None:
            options = scale_by_kl(model, modules, weights, channel_power, slots, options, calibration)
        head_hessian = None  # the metric of low-rank tiers: the output's, when the embedding is also the output
        if tiers:  # calibration is there: tiers come from it
            head_hessian = output_hessian(head_inputs) if model.output is None else None
            options.update(tier_candidates(model, weights, tiers, head_inputs, head_hessian, formats, low_rank,
                                           self.unseen_mass, self.low_rank_below, calibration))
        _last_analysis = (key, (slots, options, head_hessian))
        return _last_analysis[1]

    def _analysis_key(self, model: nn.Module, calibration) -> str:
        digest = hashlib.blake2b(digest_size=16)
        settings = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("target_bpw", "method")}
        digest.update(repr(sorted(settings.items())).encode())
        for name, tensor in [*model.state_dict().items(), ("calibration", None if calibration is None
                                                             else calibration.tokens)]:
            digest.update(name.encode())
            if tensor is not None:
                digest.update(f"{tuple(tensor.shape)}{tensor.dtype}".encode())
                digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
        return digest.hexdigest()

    def slots(self, model: nn.Module, modules: dict[str, nn.Module], head_inputs: torch.Tensor | None,
              calibration) -> dict[str, Slot]:
        """Units of allocation: one per tensor, but the token embedding split into row tiers by importance."""
        slots = {name: Slot(name) for name in modules}
        name = "tok_embeddings"
        if not self.embedding_tiers or name not in modules or head_inputs is None:
            return slots
        n_rows = modules[name].weight.shape[0]
        order = row_importance(model, head_inputs, calibration.tokens).argsort(descending=True)
        bounds = [0, *sorted(b for b in self.embedding_tiers if 0 < b < n_rows), n_rows]
        del slots[name]
        for k, (start, end) in enumerate(zip(bounds, bounds[1:])):
            slots[f"{name}[{k}]"] = Slot(name, order[start:end].sort().values)
        return slots


_last_analysis: tuple[str, tuple] | None = None  # (key, MixedPrecision.analyze's result)


@dataclass(frozen=True)
class Slot:
    module: str
    rows: torch.Tensor | None = None  # a row tier of the module, or the whole of it

    def weight(self, weights: dict[str, torch.Tensor]) -> torch.Tensor:
        w = weights[self.module]
        return w if self.rows is None else w[self.rows]


@torch.inference_mode()
def row_importance(model: nn.Module, head_inputs: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """How much each vocabulary row matters on the calibration text: the mean probability the model gives
    the token (its weight in the output's Fisher information) plus its frequency as an input (lookups),
    each normalized to sum to 1. Most of a 262k vocabulary scores ~0 on any one kind of text."""
    flat = head_inputs.reshape(-1, head_inputs.shape[-1])
    mass = torch.zeros(model.args.vocab_size, dtype=torch.float64)
    for chunk in flat.split(256):
        mass += torch.softmax(model.logits(chunk[None]).float(), -1)[0].sum(0).double()
    counts = torch.bincount(tokens.reshape(-1), minlength=model.args.vocab_size).double()
    return (mass / mass.sum() + counts / counts.sum()).float()


def candidates(weight: torch.Tensor, power: torch.Tensor | None,
               formats: tuple[tuple[int, int, bool], ...]) -> list[Candidate]:
    out_features, in_features = weight.shape
    importance = power if power is not None else torch.ones(in_features)
    result = []
    for bits, group, fit in formats:
        if in_features % group:
            continue
        scheme = QuantScheme(bits, group, fit=fit)
        error = (weight - fake_quantize(weight, scheme)).pow(2)
        damage = float((error * importance[None, :]).sum())
        result.append(Candidate(bits, group, damage, grid_bytes(out_features, in_features, bits, group, fit), fit=fit))
    if not result:
        raise RecipeError(f"mixed: no format fits a tensor with {in_features} input features")
    return result


def grid_bytes(rows: int, in_features: int, bits: int, group: int, fit: bool) -> int:
    """Stored bytes of rows on a grid: packed codes, per group a fp16 scale and a uint8 (fitted: fp16) zero."""
    return rows * (-(-in_features * bits // 8) + (4 if fit else 3) * (in_features // group))


REFERENCE_BITS = 3
KL_SAMPLES, KL_TOKENS = 2, 128


@torch.inference_mode()
def scale_by_kl(model, modules, weights, channel_power, slots, options, calibration) -> dict[str, list[Candidate]]:
    """Re-express each slot's damages in KL units: one forward pass per slot at the reference format."""
    tokens = calibration.tokens[:KL_SAMPLES, :KL_TOKENS]
    positions = slice(tokens.shape[1] // 2, None)  # later positions: full context, and fewer logits to compute
    reference = torch.log_softmax(model(tokens, logits_at=positions).float(), -1)
    scaled = {}
    for key in progress(list(options), "sensitivity", "tensor"):
        slot = slots[key]
        module, full, weight = modules[slot.module], weights[slot.module], slot.weight(weights)
        group = next(g for g in (64, 32, 128) if weight.shape[1] % g == 0)
        scheme = QuantScheme(REFERENCE_BITS, group)
        quantized = fake_quantize(weight, scheme)
        saved = module.weight.data
        if slot.rows is None:
            module.weight.data = quantized
        else:
            module.weight.data = full.clone()
            module.weight.data[slot.rows] = quantized
        logp = torch.log_softmax(model(tokens, logits_at=positions).float(), -1)
        module.weight.data = saved
        kl = float((reference.exp() * (reference - logp)).sum(-1).mean())
        power = channel_power.get(slot.module)
        ref_damage = float(((weight - quantized).pow(2) * (power if power is not None else 1.0)).sum())
        unit = max(kl, 1e-12) / max(ref_damage, 1e-30)
        scaled[key] = [c.scaled(unit) for c in options[key]]
    return scaled


def output_hessian(head_inputs: torch.Tensor) -> torch.Tensor:
    """E[h hᵀ] of the output matrix's inputs (the final normed hidden states)."""
    flat = head_inputs.reshape(-1, head_inputs.shape[-1]).float()
    return (flat.T @ flat) / flat.shape[0]


# Positions of the calibration text on which the output's KL is measured for every tier and format, and
# the first positions of each sample left out (the states right after BOS are unlike the rest).
HEAD_POSITIONS, HEAD_SKIP = 1024, 16
TIER_SAMPLE_ROWS = 16384


@torch.inference_mode()
def tier_candidates(model, weights, tiers: dict[str, Slot], head_inputs: torch.Tensor, hessian: torch.Tensor | None,
                    formats, low_rank: tuple[LowRankFormat, ...], unseen_mass: float, low_rank_below: float,
                    calibration) -> dict[str, list[Candidate]]:
    """Candidates for the embedding's row tiers, with damage in KL units measured, not extrapolated.

    Output: each tier's rows are replaced by a candidate's reconstruction and the KL of the next-token
    distribution is computed exactly on HEAD_POSITIONS final hidden states: only the tier's logits change,
    so with p the reference distribution, l its logits and l' the new ones,
        KL = Σ_tier p (l - l') + log(1 - Σ_tier p + Σ_tier p e^(l' - l)).
    Noise in the rows of rare tokens lifts the softmax's tail, a damage far from proportional to squared
    error (1-bit rows cost ~6x what 3-bit rows predict); measuring it catches that. The result is scaled by
    the tier's share of probability mass under the `unseen_mass` prior over its share on calibration text
    (tiers are in order of importance, so tier k's Zipf share is log(end/start) / log(vocab)).
    Input damage: the KL per occurrence of one of the tier's tokens as an input (LookupProbe), times the
    tier's share of input tokens under the same prior.

    Low-rank and 1-bit formats are offered only to rare tiers (calibration mass under `low_rank_below`):
    a tier the calibration text predicts now and then holds the next tokens of other text, whose damage
    the measurement cannot see (gemma-3-270m at 2.5 bpw gave 1-bit rows to its 65k-131k tier, measured
    cheap; on the test text the model's KLD went from 0.24 to 0.66)."""
    name = next(iter(tiers.values())).module
    full = weights[name]
    tied = name == "tok_embeddings" and model.output is None  # rows that are also the output matrix
    states = _head_positions(head_inputs)
    cap = getattr(model, "final_softcap", None)

    def logits(w: torch.Tensor) -> torch.Tensor:
        out = states @ w.T
        return torch.tanh(out / cap) * cap if cap else out

    if tied:
        parts = [torch.logsumexp(logits(part), -1, keepdim=True) for part in full.split(32768)]
        log_z = torch.logsumexp(torch.cat(parts, -1), -1, keepdim=True)
    probe = LookupProbe(model, full, calibration)
    vocab = full.shape[0]
    result = {}
    first = 0
    for key, slot in progress(tiers.items(), "embedding tiers", "tier"):
        n_rows = slot.rows.numel()
        zipf = math.log((first + n_rows + 0.5) / (first + 0.5)) / math.log(vocab + 0.5)
        first += n_rows
        # Large tiers are measured on a sample of their rows: each row adds its own term to the KL (to first
        # order), so the sample's damage times n_rows / sample size stands for the tier's.
        rows = slot.rows
        if n_rows > TIER_SAMPLE_ROWS:
            rows = rows[torch.randperm(n_rows, generator=torch.Generator().manual_seed(0))[:TIER_SAMPLE_ROWS]]
        w, spread = full[rows], n_rows / rows.numel()
        mass = 0.0
        if tied:
            mass = sum(float((logits(part) - log_z).exp().sum(-1).mean()) for part in full[slot.rows].split(32768))
            reference = logits(w)
            p = (reference - log_z).exp()
            weight = spread * ((1 - unseen_mass) * mass + unseen_mass * zipf) / max(mass, 1e-12)
        occurrences = (1 - unseen_mass) * probe.frequency(slot.rows) + unseen_mass * zipf
        lookup_reference = probe.reference(rows)

        def damage(approx: torch.Tensor) -> float:
            lookup = occurrences * probe(rows, approx, lookup_reference)
            if not tied:
                return lookup
            new = logits(approx)
            kl = (p * (reference - new)).sum(-1) + torch.log1p((p * ((new - reference).exp() - 1)).sum(-1))
            return float(kl.mean()) * weight + lookup

        rare = mass < low_rank_below
        options = []
        for bits, group, fit in formats:
            if w.shape[1] % group or (bits == 1 and not rare):
                continue
            approx = fake_quantize(w, QuantScheme(bits, group, fit=fit))
            options.append(Candidate(bits, group, damage(approx), grid_bytes(n_rows, w.shape[1], bits, group, fit),
                                     fit=fit))
        for fmt in low_rank if rare else ():
            approx = LowRankRows.fit(w, fmt, hessian).dequantize()
            options.append(Candidate(fmt.bits, 0, damage(approx), fmt.nbytes(n_rows, w.shape[1]), low_rank=fmt))
        if not options:
            raise RecipeError(f"mixed: no format fits the embedding's {w.shape[1]} columns")
        result[key] = options
    return result


def _head_positions(head_inputs: torch.Tensor) -> torch.Tensor:
    states = head_inputs[:, HEAD_SKIP:].reshape(-1, head_inputs.shape[-1]).float()
    if states.shape[0] > HEAD_POSITIONS:
        pick = torch.randperm(states.shape[0], generator=torch.Generator().manual_seed(0))[:HEAD_POSITIONS]
        states = states[pick.sort().values]
    return states


class _FixedOutput(nn.Module):
    """The output matrix as it was: lets a tied embedding's lookups change alone."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = weight

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h @ self.weight.T


class _ProbeEmbedding(nn.Module):
    """Token lookups from `weight`, except the rows given in `override` (row id -> vector)."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = weight
        self.override: dict[int, torch.Tensor] = {}

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.weight[ids]
        for row, vector in self.override.items():
            out[ids == row] = vector
        return out


# Lookup probes: calibration windows of PROBE_TOKENS tokens with a token of the tier put in every PROBE_GAP
# positions from the PROBE_GAP-th on; the KL of the following predictions is measured.
PROBE_TOKENS, PROBE_GAP = 128, 16


class LookupProbe:
    """The damage a tier's rows do as *inputs*: the KL of the model's predictions, per occurrence of one of
    the tier's tokens, when their looked-up rows are replaced by a candidate's, the output matrix unchanged.
    Measured with tier tokens planted in calibration windows, so rare tiers (absent from any calibration
    sample) are measured too; times the tier's expected frequency as an input it is a damage per position."""

    def __init__(self, model, full: torch.Tensor, calibration):
        self.model, self.full = model, full
        self.tokens = tokens = calibration.tokens[:KL_SAMPLES, :PROBE_TOKENS].clone()
        self.slots = torch.arange(PROBE_GAP, tokens.shape[1], PROBE_GAP)  # planted positions per window
        self.scored = slice(PROBE_GAP, tokens.shape[1] - 1)
        self.counts = torch.bincount(calibration.tokens.reshape(-1), minlength=full.shape[0]).double()

    def planted(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Windows with rows of the tier (indices into `rows`, spread over it) at the probe positions."""
        n = self.tokens.shape[0] * self.slots.numel()
        pick = torch.linspace(0, rows.numel() - 1, n).round().long()
        tokens = self.tokens.clone()
        tokens[:, self.slots] = rows[pick].view(self.tokens.shape[0], -1)
        return tokens, pick

    def __call__(self, rows: torch.Tensor, approx: torch.Tensor, reference: torch.Tensor | None = None) -> float:
        """Mean KL per planted occurrence with the planted rows (`rows`, reconstructed as `approx`) changed."""
        reference = self.reference(rows) if reference is None else reference
        logp = self._log_probs(rows, approx)
        kl = (reference.exp() * (reference - logp)).sum(-1).sum()
        return float(kl) / (self.tokens.shape[0] * self.slots.numel())

    def reference(self, rows: torch.Tensor) -> torch.Tensor:
        return self._log_probs(rows)

    @torch.inference_mode()
    def _log_probs(self, rows: torch.Tensor, approx: torch.Tensor | None = None) -> torch.Tensor:
        """Log-probabilities at the scored positions of the planted windows, the planted rows' lookups
        replaced by `approx` when given (the output matrix stays the original)."""
        tokens, pick = self.planted(rows)
        probe = _ProbeEmbedding(self.full)
        if approx is not None:
            for i in pick.unique().tolist():
                probe.override[int(rows[i])] = approx[i]
        model, embedding, output = self.model, self.model.tok_embeddings, self.model.output
        model.tok_embeddings = probe
        model.output = _FixedOutput(self.full) if output is None else output
        try:
            return torch.log_softmax(model(tokens, logits_at=self.scored).float(), -1)
        finally:
            model.tok_embeddings, model.output = embedding, output

    def frequency(self, rows: torch.Tensor) -> float:
        """The tier's share of the calibration text's tokens."""
        return float(self.counts[rows].sum() / self.counts.sum())


def allocate(options: dict[str, list[Candidate]], budget: int) -> dict[str, Candidate] | None:
    """One candidate per tensor with total bytes <= budget and (near-)minimal total damage."""
    if sum(min(c.nbytes for c in opts) for opts in options.values()) > budget:
        return None

    def pick(lam: float) -> dict[str, Candidate]:
        return {name: min(opts, key=lambda c: (c.damage + lam * c.nbytes, c.nbytes)) for name, opts in options.items()}

    def total(choice: dict[str, Candidate]) -> int:
        return sum(c.nbytes for c in choice.values())

    lo, hi = 0.0, 1.0
    while total(pick(hi)) > budget:
        hi *= 4
    if total(pick(lo)) <= budget:
        return pick(lo)
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if total(pick(mid)) <= budget else (mid, hi)
    choice = pick(hi)
    # Spend what the relaxation left over: best damage saved per extra byte first.
    spare = budget - total(choice)
    while True:
        best = None
        for name, opts in options.items():
            current = choice[name]
            for c in opts:
                extra = c.nbytes - current.nbytes
                if 0 < extra <= spare and c.damage < current.damage:
                    gain = (current.damage - c.damage) / extra
                    if best is None or gain > best[0]:
                        best = (gain, name, c)
        if best is None:
            return choice
        _, name, c = best
        spare -= c.nbytes - choice[name].nbytes
        choice[name] = c


def fixed_bytes(model: nn.Module, quantized: dict[str, nn.Module]) -> int:
    """Bytes of everything that is not quantized here (norms, biases, ignored layers), as model_size counts."""
    quantized_params = {id(m.weight) for m in quantized.values()}
    return sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in quantized_params)


def input_channel_power(model: nn.Module, modules: dict[str, nn.Module],
                        calibration) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """E[x_j²] of every target module's inputs on the calibration data ({} without data), and the final
    normed hidden states (the output matrix's inputs)."""
    if calibration is None:
        return {}, None
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def observe(name: str, x: torch.Tensor) -> None:
        sums[name] = sums.get(name, 0) + x.pow(2).sum(0)
        counts[name] = counts.get(name, 0) + x.shape[0]

    runner = BlockRunner(model, calibration)
    linears = {name: m for name, m in modules.items() if isinstance(m, nn.Linear)}
    with capture_inputs(linears, observe):
        for i in progress(range(len(model.layers)), "input statistics", "block"):
            runner.advance(i)
        head_inputs = runner.final_hidden()
    power = {name: sums[name] / counts[name] for name in sums}
    head = "output" if "output" in modules else "tok_embeddings"
    if head in modules:  # the (tied) output matrix sees the final normed hidden states
        flat = head_inputs.reshape(-1, head_inputs.shape[-1])
        power[head] = flat.pow(2).mean(0)
    return power, head_inputs
