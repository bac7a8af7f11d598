"""Low-rank factorization (SVD) and low-rank compensation of quantization error (LoRC)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import edgelm
from edgelm.compress import RTN, compress, parse_recipe
from edgelm.compress.lowrank import SVD, LoRC, LoRCEmbedding, LoRCLinear, LowRankLinear
from edgelm.compress.quant.modules import QuantizedLinear
from edgelm.errors import RecipeError
from edgelm.io.artifact import CONFIG, model_size, save_artifact
from tests.tiny_gguf import TinyConfig, write_tiny_model


def tiny(tmp_path, arch="gemma3"):
    path = write_tiny_model(tmp_path / f"{arch}.gguf", TinyConfig(arch=arch, dim=128, hidden_dim=256))
    return edgelm.load(path)


def logits(model, ids):
    with torch.inference_mode():
        return model(ids).float()


def kl(reference_logits, logits_):
    """KL(reference || model) per token, averaged."""
    return float(F.kl_div(logits_.log_softmax(-1), reference_logits.log_softmax(-1), log_target=True,
                          reduction="none").sum(-1).mean())


def single_linear(weight: torch.Tensor) -> nn.Module:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=True)
    with torch.no_grad():
        layer.weight.copy_(weight)
    return nn.Sequential(layer)


def decaying_spectrum(out=96, inp=160, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(out, out, generator=g))
    v, _ = torch.linalg.qr(torch.randn(inp, out, generator=g))
    return u @ torch.diag(0.9 ** torch.arange(out, dtype=torch.float32)) @ v.T


def make_low_rank(model: nn.Module, rank: int, noise: float = 1e-3) -> None:
    """Project every Linear of the model near rank `rank` so that SVD has something to factorize."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear):
                u, s, vh = torch.linalg.svd(module.weight, full_matrices=False)
                low = (u[:, :rank] * s[:rank]) @ vh[:rank]
                module.weight.copy_(low + noise * low.std() * torch.randn(low.shape, generator=g))


# -- SVD ----------------------------------------------------------------------------------------------------
def test_exact_rank_4_weight_is_recovered_exactly():
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(96, 4, generator=g) @ torch.randn(4, 160, generator=g)
    model = single_linear(weight)
    x = torch.randn(5, 160, generator=g)
    expected = model(x)
    compress(model, SVD(energy=0.999))
    layer = model[0]
    assert isinstance(layer, LowRankLinear) and layer.rank == 4
    assert layer.U.shape == (96, 4) and layer.V.shape == (4, 160)
    torch.testing.assert_close(layer.weight, weight, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-4)


def test_more_energy_means_higher_rank_and_lower_error():
    weight = decaying_spectrum()
    ranks, errors = [], []
    for energy in (0.5, 0.8, 0.95, 0.99, 0.999):
        model = compress(single_linear(weight), SVD(energy=energy))
        layer = model[0]
        assert isinstance(layer, LowRankLinear)
        ranks.append(layer.rank)
        errors.append(float((layer.weight - weight).detach().norm()))
        # Energy kept is at least what was asked: the error is at most the dropped share of the norm.
        assert errors[-1] ** 2 <= (1 - energy) * float(weight.norm()) ** 2 * (1 + 1e-4)
    assert ranks == sorted(ranks) and len(set(ranks)) == len(ranks), ranks
    assert errors == sorted(errors, reverse=True), errors


def test_factorized_layers_are_never_larger_than_dense(tmp_path):
    model, _ = tiny(tmp_path)
    make_low_rank(model, rank=24)
    dense = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    compress(model, SVD(energy=0.999))
    factorized = {name: m for name, m in model.named_modules() if isinstance(m, LowRankLinear)}
    assert factorized, "near rank-24 layers should be factorized"
    for name, layer in factorized.items():
        assert layer.rank * (layer.out_features + layer.in_features) < layer.out_features * layer.in_features
    # A full-spectrum weight at energy 1.0 would need full rank: it stays dense.
    full = compress(single_linear(torch.randn(64, 64)), SVD(energy=1.0))
    assert isinstance(full[0], nn.Linear)
    # The cap limits the rank (and 0.999 of a 0.9^k spectrum needs ~65 of 96).
    capped = compress(single_linear(decaying_spectrum()), SVD(energy=0.999, max_rank_ratio=0.25))
    assert capped[0].rank == 24
    assert set(dense) >= set(factorized)


def test_factorized_model_logits_stay_close(tmp_path):
    model, _ = tiny(tmp_path, "qwen2")
    make_low_rank(model, rank=24)
    ids = torch.randint(3, model.args.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    expected = logits(model, ids)
    before = model_size(model)
    compress(model, SVD(energy=0.999, ignore=("layers.2.*",)))
    layers = [m for m in model.modules() if isinstance(m, LowRankLinear)]
    assert len(layers) >= 6 and not isinstance(model.layers[2].attn.wq, LowRankLinear)
    torch.testing.assert_close(logits(model, ids), expected, rtol=0.02, atol=0.02)
    after = model_size(model)
    # Same weights represented; bytes drop by exactly the dense matrices minus the factors.
    assert after["parameters"] == before["parameters"]
    saved = sum(4 * (m.out_features * m.in_features - m.rank * (m.out_features + m.in_features)) for m in layers)
    assert after["bytes"] == before["bytes"] - saved


def test_svd_fields_are_checked():
    with pytest.raises(RecipeError, match="energy"):
        SVD(energy=0.0)
    with pytest.raises(RecipeError, match="max_rank_ratio"):
        SVD(max_rank_ratio=1.5)
    assert parse_recipe([{"svd": {"energy": 0.9, "max_rank_ratio": 0.5}}]) == [SVD(energy=0.9, max_rank_ratio=0.5)]


# -- LoRC ---------------------------------------------------------------------------------------------------
def quantized_pair(tmp_path, embedding=False):
    """(float model, RTN-3 model, RTN-3 + LoRC-8 model) of the tiny qwen2 model (tied embedding; the tiny
    gemma3 model's logits are too peaked for a KL to measure anything)."""
    model, tokenizer = tiny(tmp_path, "qwen2")
    reference = copy.deepcopy(model)
    rtn = compress(copy.deepcopy(model), RTN(bits=3, group_size=32))
    lorc = compress(model, [RTN(bits=3, group_size=32), LoRC(rank=8, embedding=embedding)])
    return reference, rtn, lorc, tokenizer


def test_lorc_reduces_weight_error_and_kl(tmp_path):
    reference, rtn, lorc, _ = quantized_pair(tmp_path)
    compensated = {name: m for name, m in lorc.named_modules() if isinstance(m, LoRCLinear)}
    assert len(compensated) == 3 * 7  # every linear of the 3 blocks
    for name, layer in compensated.items():
        original = reference.get_submodule(name).weight
        rtn_error = (original - rtn.get_submodule(name).weight).norm()
        assert isinstance(layer.quantized, QuantizedLinear)
        torch.testing.assert_close(layer.quantized.weight, rtn.get_submodule(name).weight, rtol=0, atol=0)
        assert (original - layer.weight).norm() < 0.99 * rtn_error, name
    ids = torch.randint(3, reference.args.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    ref_logits = logits(reference, ids)
    kl_rtn, kl_lorc = kl(ref_logits, logits(rtn, ids)), kl(ref_logits, logits(lorc, ids))
    assert kl_lorc < kl_rtn, (kl_lorc, kl_rtn)


def test_lorc_can_compensate_the_tied_embedding(tmp_path):
    reference, rtn, lorc, _ = quantized_pair(tmp_path, embedding=True)
    assert isinstance(lorc.tok_embeddings, LoRCEmbedding)
    original = reference.tok_embeddings.weight
    assert (original - lorc.tok_embeddings.weight).norm() < (original - rtn.tok_embeddings.weight).norm()
    ids = torch.randint(3, reference.args.vocab_size, (1, 12))
    # The lookup returns rows of the compensated matrix that the tied output uses.
    torch.testing.assert_close(lorc.tok_embeddings(ids), lorc.tok_embeddings.weight[ids], rtol=1e-5, atol=1e-5)


def test_lorc_after_awq_compensates_in_the_scaled_basis(tmp_path):
    """AWQ folds its scales into the weights (W·diag(s)) and the ops before them; LoRC after it must
    compensate W·diag(s) − Q(W·diag(s)), not W − Q(W·diag(s)), or it adds error instead of removing it."""
    from edgelm.compress.calibration import Calibration
    from edgelm.compress.quant.awq import AWQ

    model, _ = tiny(tmp_path, "qwen2")
    with torch.no_grad():  # outsized activations on a few channels, as real models have: AWQ's s != 1
        for norm in [model.norm] + [m for layer in model.layers for m in (layer.attn_norm, layer.ffn_norm)]:
            norm.weight[[1, 7, 20]] *= 30.0
    reference = copy.deepcopy(model)
    calibration = Calibration(torch.randint(3, model.args.vocab_size, (4, 24),
                                            generator=torch.Generator().manual_seed(0)), "random")
    awq = AWQ(bits=3, group_size=32, n_grid=10)
    torch.manual_seed(0)
    awq_only = compress(copy.deepcopy(model), awq, calibration)
    torch.manual_seed(0)
    awq_lorc = compress(model, [awq, LoRC(rank=16)], calibration)
    assert not hasattr(model, "compression_reference")
    compensated = {name: m for name, m in awq_lorc.named_modules() if isinstance(m, LoRCLinear)}
    assert len(compensated) == 3 * 7
    for name, layer in compensated.items():  # the same AWQ result underneath, plus a correction
        torch.testing.assert_close(layer.quantized.weight, awq_only.get_submodule(name).weight, rtol=0, atol=0)
    ids = torch.randint(3, reference.args.vocab_size, (2, 32), generator=torch.Generator().manual_seed(1))
    ref_logits = logits(reference, ids)
    kl_awq, kl_lorc = kl(ref_logits, logits(awq_only, ids)), kl(ref_logits, logits(awq_lorc, ids))
    assert kl_lorc < 0.9 * kl_awq, (kl_lorc, kl_awq)


def test_lorc_fields_and_missing_float_weights_are_errors(tmp_path):
    for rank in (0, -3):
        with pytest.raises(RecipeError, match="rank must be a positive"):
            LoRC(rank=rank)
    with pytest.raises(RecipeError, match="rank must be a positive"):
        parse_recipe([{"lorc": {"rank": 0}}])
    model, _ = tiny(tmp_path)
    compress(model, RTN(bits=3, group_size=32))
    with pytest.raises(RecipeError, match="after a quantization step in the same recipe"):
        compress(model, LoRC(rank=8))  # already quantized before this recipe: nothing float to compare with


# -- artifacts ----------------------------------------------------------------------------------------------
def round_trip(model, tokenizer, out):
    save_artifact(model, tokenizer, out)
    loaded, _ = edgelm.load(out)
    ids = torch.randint(3, model.args.vocab_size, (1, 20), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(logits(loaded, ids), logits(model, ids), rtol=0, atol=0)
    assert json.loads((out / CONFIG).read_text())["stats"] == model_size(loaded) == model_size(model)
    return json.loads((out / CONFIG).read_text())["quantized_modules"]


def test_lowrank_round_trip_is_exact(tmp_path):
    model, tokenizer = tiny(tmp_path, "qwen2")
    make_low_rank(model, rank=24)
    compress(model, SVD(energy=0.999))
    layout = round_trip(model, tokenizer, tmp_path / "svd")
    lowrank = {name: spec for name, spec in layout.items() if spec["kind"] == "lowrank"}
    assert lowrank and all(spec["bias"] for name, spec in lowrank.items() if name.endswith("attn.wq"))
    assert {spec["rank"] for spec in lowrank.values()} <= set(range(1, 64))


def test_lorc_round_trip_is_exact_and_counts_the_factor_bytes(tmp_path):
    _, rtn, lorc, tokenizer = quantized_pair(tmp_path, embedding=True)
    layout = round_trip(lorc, tokenizer, tmp_path / "lorc")
    assert layout["tok_embeddings"] == {"kind": "lorc", "wraps": "embedding", "out_features":
                                        lorc.tok_embeddings.num_embeddings, "in_features": 128, "bits": 3,
                                        "group_size": 32, "symmetric": False, "bias": False, "rank": 8,
                                        "layout": "planes"}
    assert layout["layers.0.attn.wq"]["kind"] == "lorc" and layout["layers.0.attn.wq"]["wraps"] == "linear"
    assert not any(name.endswith(".quantized") for name in layout)
    # Same weights represented; every compensated matrix adds r (out + in) float16 numbers.
    plain, compensated = model_size(rtn), model_size(lorc)
    extra = sum(2 * 8 * (m.U.shape[0] + m.V.shape[1]) for m in lorc.modules()
                if isinstance(m, (LoRCLinear, LoRCEmbedding)))
    assert compensated["parameters"] == plain["parameters"]
    assert compensated["bytes"] == plain["bytes"] + extra
    assert compensated["bits_per_weight"] == pytest.approx(plain["bits_per_weight"] + 8 * extra / plain["parameters"])
