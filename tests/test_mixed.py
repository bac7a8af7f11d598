"""Mixed precision: the allocation is optimal on small instances and the model meets its bpw budget."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

import edgelm
from edgelm.compress import MixedPrecision, compress, parse_recipe
from edgelm.compress.calibration import Calibration
from edgelm.compress.quant.mixed import Candidate, allocate
from edgelm.errors import RecipeError
from edgelm.io.artifact import model_size
from tests.tiny_gguf import TinyConfig, write_tiny_model


def brute_force(options, budget):
    best = None
    for combo in itertools.product(*options.values()):
        if sum(c.nbytes for c in combo) <= budget:
            damage = sum(c.damage for c in combo)
            if best is None or damage < best:
                best = damage
    return best


def test_allocation_is_near_optimal():
    rng = random.Random(0)
    for _ in range(30):
        options = {}
        for t in range(4):
            size = rng.randint(50, 200)
            # Monotone formats: more bytes, less damage (quantization error halves per extra bit).
            options[f"t{t}"] = [Candidate(bits, 64, size * rng.uniform(0.5, 2) * 4.0 ** -bits, size * bits)
                                for bits in (2, 3, 4, 8)]
        cheapest = sum(min(c.nbytes for c in o) for o in options.values())
        budget = cheapest + rng.randint(0, 1500)
        choice = allocate(options, budget)
        assert sum(c.nbytes for c in choice.values()) <= budget
        optimum = brute_force(options, budget)
        assert sum(c.damage for c in choice.values()) <= optimum * 1.25 + 1e-12
    assert allocate({"a": [Candidate(2, 64, 1.0, 100)]}, 99) is None


@pytest.mark.parametrize("target", [3.0, 4.5, 6.0])
def test_model_meets_the_target_bpw(tmp_path, target):
    path = write_tiny_model(tmp_path / "m.gguf", TinyConfig(arch="qwen2", dim=128, hidden_dim=256, n_layers=4))
    model, _ = edgelm.load(path)
    calibration = Calibration(torch.randint(3, model.args.vocab_size, (4, 32)), "random")
    compress(model, [MixedPrecision(target_bpw=target)], calibration)
    achieved = model_size(model)["bits_per_weight"]
    assert target - 0.25 <= achieved <= target
    plan = model.mixed_precision_plan
    assert len(set(plan.values())) > 1 or target == 3.0  # genuinely mixed at generous budgets


def test_bad_targets_and_formats_are_named(tmp_path):
    with pytest.raises(RecipeError, match="target_bpw must be between"):
        MixedPrecision(target_bpw=1.0)
    with pytest.raises(RecipeError, match="'4-64' must be 'bits:group_size'"):
        parse_recipe([{"mixed": {"formats": ["4-64"]}}])
    path = write_tiny_model(tmp_path / "m.gguf", TinyConfig(arch="qwen2", dim=128, hidden_dim=256))
    model, _ = edgelm.load(path)
    with pytest.raises(RecipeError, match="below the smallest model"):
        compress(model, [MixedPrecision(target_bpw=2.0, formats=("8:64",))], None)


def test_gptq_applies_the_plan_better_than_rtn(tmp_path):
    """Same allocation, two quantizers: GPTQ's model stays closer to the float model than RTN's."""
    from edgelm.bench.quality import perplexity

    path = write_tiny_model(tmp_path / "m.gguf", TinyConfig(arch="qwen2", dim=128, hidden_dim=256, n_layers=2))
    reference, _ = edgelm.load(path)
    tokens = torch.randint(3, reference.args.vocab_size, (32, 64), generator=torch.Generator().manual_seed(0))
    calibration = Calibration(tokens, "random")
    klds = {}
    for method in ("rtn", "gptq"):
        model, _ = edgelm.load(path)
        compress(model, [MixedPrecision(target_bpw=3.5, method=method)], calibration)
        held_out = torch.randint(3, reference.args.vocab_size, (256,), generator=torch.Generator().manual_seed(1))
        klds[method] = perplexity(model, held_out.tolist(), ctx=64, progress=False, reference=reference).kld
    assert klds["gptq"] < 0.9 * klds["rtn"], klds
    with pytest.raises(RecipeError, match="method must be 'gptq' or 'rtn'"):
        MixedPrecision(method="awq")


def test_one_analysis_serves_every_budget_of_the_same_model(tmp_path):
    """Compressing the same model to several budgets measures it once; the reused analysis gives the
    model a fresh one would, and any change to the weights, the data or the settings measures again."""
    import copy

    from edgelm.compress.quant import mixed

    path = write_tiny_model(tmp_path / "m.gguf", TinyConfig(arch="qwen2", dim=128, hidden_dim=256, n_layers=2))
    base, _ = edgelm.load(path)
    calibration = Calibration(torch.randint(3, base.args.vocab_size, (4, 32), generator=torch.Generator()
                                            .manual_seed(0)), "random")
    mixed._last_analysis = None
    compress(copy.deepcopy(base), [MixedPrecision(target_bpw=4.5)], calibration)
    first = mixed._last_analysis
    reused = compress(copy.deepcopy(base), [MixedPrecision(target_bpw=3.0, method="rtn")], calibration)
    assert mixed._last_analysis is first
    mixed._last_analysis = None
    fresh = compress(copy.deepcopy(base), [MixedPrecision(target_bpw=3.0, method="rtn")], calibration)
    assert fresh.mixed_precision_plan == reused.mixed_precision_plan
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), reused.state_dict().values()))

    keys = [mixed._last_analysis[0]]
    changed = copy.deepcopy(base)
    with torch.no_grad():
        changed.layers[0].attn.wq.weight.mul_(1.01)
    compress(changed, [MixedPrecision(target_bpw=3.0)], calibration)
    keys.append(mixed._last_analysis[0])
    other_data = Calibration(calibration.tokens.flip(0), "random")
    compress(copy.deepcopy(base), [MixedPrecision(target_bpw=3.0)], other_data)
    keys.append(mixed._last_analysis[0])
    compress(copy.deepcopy(base), [MixedPrecision(target_bpw=3.0, unseen_mass=0.2)], other_data)
    keys.append(mixed._last_analysis[0])
    assert len(set(keys)) == 4
