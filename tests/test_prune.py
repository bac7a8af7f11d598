"""Pruning steps: exact sparsity patterns, the quality order magnitude < Wanda < SparseGPT, strict fields."""

from __future__ import annotations

import copy
import re

import pytest
import torch
import torch.nn.functional as F

import edgelm
from edgelm.compress import compress, parse_recipe
from edgelm.compress.calibration import Calibration
from edgelm.compress.prune import Magnitude, SparseGPT, Wanda, sparsity_of
from edgelm.compress.prune.magnitude import magnitude_prune
from edgelm.compress.prune.masks import parse_sparsity
from edgelm.compress.prune.sparsegpt import sparsegpt_prune
from edgelm.compress.prune.wanda import wanda_prune
from edgelm.errors import RecipeError
from tests.tiny_gguf import TinyConfig, write_tiny_model

METHODS = [Magnitude, Wanda, SparseGPT]
IGNORED = "layers.1.ffn.*"


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    # Untied, so that the separate output head is there to be left alone.
    config = TinyConfig(arch="qwen2", dim=128, hidden_dim=256, n_layers=2, tied=False)
    return write_tiny_model(tmp_path_factory.mktemp("prune") / "m.gguf", config)


def random_calibration(model, n_samples: int, seq_len: int, seed: int) -> Calibration:
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(3, model.args.vocab_size, (n_samples, seq_len), generator=generator)
    return Calibration(tokens, "random")


# -- exact patterns -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.name)
@pytest.mark.parametrize("sparsity", [0.5, "2:4"])
def test_exact_sparsity_and_untouched_modules(tiny_path, method, sparsity):
    model, _ = edgelm.load(tiny_path)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    compress(model, method(sparsity=sparsity, ignore=(IGNORED,)), random_calibration(model, 4, 32, seed=0))

    pruned = 0
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or name == "output" or name.startswith("layers.1.ffn."):
            continue
        zeros = module.weight == 0
        if sparsity == 0.5:
            assert (zeros.sum(1) == module.in_features // 2).all(), name
        else:
            assert (zeros.reshape(-1, 4).sum(1) == 2).all(), name
        pruned += 1
    assert pruned == 7 + 4  # all linears of block 0, attention of block 1
    for name in ["tok_embeddings.weight", "output.weight", "layers.1.ffn.w_gate.weight",
                 "layers.1.ffn.w_up.weight", "layers.1.ffn.w_down.weight"]:
        assert torch.equal(dict(model.named_parameters())[name], before[name]), name
    assert 0.3 < sparsity_of(model) < 0.5  # the ignored FFN (dense) pulls the total below one half


# -- quality order on one layer whose inputs have outlier channels --------------------------------------
def outlier_layer(seed: int = 0):
    """A weight and correlated calibration inputs (as real activations are: what SparseGPT compensates
    through) in which 6 of 256 channels have 20x the norm."""
    generator = torch.Generator().manual_seed(seed)
    n_tokens, n_in, n_out = 2048, 256, 64
    mixing = torch.eye(n_in) + 1.0 * torch.randn(n_in, n_in, generator=generator) / n_in ** 0.5
    inputs = torch.randn(n_tokens, n_in, generator=generator) @ mixing
    outliers = torch.randperm(n_in, generator=generator)[:6]
    inputs[:, outliers] *= 20.0
    weight = 0.02 * torch.randn(n_out, n_in, generator=generator)
    return weight, inputs


def output_error(weight, pruned, inputs) -> float:
    return float(torch.linalg.norm(inputs @ weight.T - inputs @ pruned.T))


@pytest.mark.parametrize("sparsity", [0.5, "2:4"])
def test_wanda_beats_magnitude_and_sparsegpt_beats_wanda(sparsity):
    weight, inputs = outlier_layer()
    pattern = parse_sparsity(sparsity, "test")
    hessian = 2.0 / inputs.shape[0] * inputs.T @ inputs
    errors = {
        "magnitude": output_error(weight, magnitude_prune(weight, pattern), inputs),
        "wanda": output_error(weight, wanda_prune(weight, inputs.norm(dim=0), pattern), inputs),
        "sparsegpt": output_error(weight, sparsegpt_prune(weight, hessian, pattern), inputs),
    }
    # Margins, not mere order: magnitude prunes outlier-channel weights, SparseGPT also compensates.
    assert errors["wanda"] < 0.5 * errors["magnitude"], errors
    assert errors["sparsegpt"] < 0.9 * errors["wanda"], errors


# -- whole tiny model ---------------------------------------------------------------------------------------
def kl_to_reference(reference_logits: torch.Tensor, model, tokens: torch.Tensor) -> float:
    with torch.inference_mode():
        logits = model(tokens)
    reference = F.log_softmax(reference_logits.float(), -1)
    ours = F.log_softmax(logits.float(), -1)
    return float((reference.exp() * (reference - ours)).sum(-1).mean())


def load_with_outlier_channels(path):
    """The tiny model with 4 residual channels scaled up 10x, as the outlier features of trained models."""
    model, _ = edgelm.load(path)
    with torch.no_grad():
        model.tok_embeddings.weight[:, :4] *= 10.0
    return model


@pytest.mark.parametrize("sparsity", [0.5, "2:4"])
def test_whole_model_kl_ordered(tmp_path, sparsity):
    path = write_tiny_model(tmp_path / "q.gguf", TinyConfig(arch="qwen2", dim=128, hidden_dim=256, n_layers=3))
    reference = load_with_outlier_channels(path)
    held_out = random_calibration(reference, 4, 64, seed=1).tokens  # not the calibration tokens
    with torch.inference_mode():
        reference_logits = reference(held_out)
    calibration = random_calibration(reference, 8, 64, seed=0)

    kl = {}
    for method in METHODS:
        pruned = copy.deepcopy(reference)
        compress(pruned, method(sparsity=sparsity), calibration)
        kl[method.name] = kl_to_reference(reference_logits, pruned, held_out)
    assert all(0.01 < value < float("inf") for value in kl.values()), kl
    # Seeded and deterministic; the measured gaps are 10-20 %, so no tolerance is needed.
    assert kl["sparsegpt"] <= kl["wanda"] <= kl["magnitude"], kl


# -- strict fields ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [1.5, -0.1, 1.0, "3:2", "a:b", "4:4", "0:4", "50%", True])
def test_bad_sparsity_is_a_recipe_error_naming_it(bad):
    with pytest.raises(RecipeError, match=f"sparsity.*{re.escape(repr(bad))}"):
        parse_recipe([{"wanda": {"sparsity": bad}}])


def test_other_bad_fields():
    with pytest.raises(RecipeError, match="damp"):
        SparseGPT(damp=0.0)
    with pytest.raises(RecipeError, match="block_size"):
        SparseGPT(sparsity="2:4", block_size=126)
    with pytest.raises(RecipeError, match="no field 'sparsity_ratio'"):
        parse_recipe([{"magnitude": {"sparsity_ratio": 0.5}}])


@pytest.mark.parametrize("method", [Wanda, SparseGPT], ids=lambda m: m.name)
def test_missing_calibration_is_a_recipe_error(tiny_path, method):
    model, _ = edgelm.load(tiny_path)
    with pytest.raises(RecipeError, match=f"{method.name} needs calibration"):
        compress(model, method())


def test_n_of_m_needs_divisible_widths(tiny_path):
    model, _ = edgelm.load(tiny_path)
    with pytest.raises(RecipeError, match="divisible by 3"):
        compress(model, Magnitude(sparsity="1:3"))


def test_parse_recipe_builds_pruning_steps():
    steps = parse_recipe([{"wanda": {"sparsity": "2:4"}}, {"sparsegpt": {"sparsity": 0.6, "ignore": ["layers.0.*"]}},
                          "magnitude"])
    assert steps == [Wanda(sparsity="2:4"), SparseGPT(sparsity=0.6, ignore=("layers.0.*",)), Magnitude()]
    assert steps[0].needs_calibration and steps[1].needs_calibration and not steps[2].needs_calibration
    assert parse_recipe([steps[1].to_dict()]) == [steps[1]]
