"""Low-rank row tiers: the rarest rows of a tied embedding as quantized coefficients over a basis."""

from __future__ import annotations

import pytest
import torch

import edgelm
from edgelm.compress import MixedPrecision, compress
from edgelm.compress.calibration import Calibration, BlockRunner
from edgelm.compress.quant.mixed import Slot, _head_positions, output_hessian, tier_candidates
from edgelm.compress.quant.modules import LowRankRows, RowTieredWeight
from edgelm.compress.quant.primitives import LowRankFormat, QuantScheme
from edgelm.compress.quant.rtn import rtn_quantize_weight
from edgelm.errors import RecipeError
from edgelm.io.artifact import model_size, save_artifact
from tests.tiny_gguf import TinyConfig, write_tiny_model


def metric_error(w: torch.Tensor, approx: torch.Tensor, hessian: torch.Tensor) -> float:
    e = (w - approx).double()
    return float(((e @ hessian.double()) * e).sum())


def final_hidden_states(model, calibration):
    """The output matrix's inputs on the calibration windows (what mixed measures tiers on)."""
    runner = BlockRunner(model, calibration)
    for i in range(len(model.layers)):
        runner.advance(i)
    return runner.final_hidden()


def test_fit_in_the_hessian_metric_beats_plain_svd_there():
    torch.manual_seed(0)
    w = torch.randn(2000, 128)
    # Inputs dominated by a few directions, as final hidden states are.
    x = torch.randn(4096, 128) * torch.logspace(1, -2, 128)
    hessian = x.T @ x / x.shape[0]
    fmt = LowRankFormat(16, 8)
    weighted = LowRankRows.fit(w, fmt, hessian)
    plain = LowRankRows.fit(w, fmt)
    assert metric_error(w, weighted.dequantize(), hessian) < 0.5 * metric_error(w, plain.dequantize(), hessian)
    # Plain SVD at 8 bits is close to the best rank-16 approximation.
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    best = (u[:, :16] * s[:16]) @ vh[:16]
    assert float((w - plain.dequantize()).pow(2).sum()) < 1.02 * float((w - best).pow(2).sum())
    assert plain.storage_bytes == fmt.nbytes(2000, 128) == 2000 * (16 * 8 // 8 + 4) + 2 * 16 * 128


def test_tiered_weight_with_a_low_rank_part_multiplies_as_it_dequantizes():
    torch.manual_seed(0)
    w = torch.randn(700, 128)
    order = torch.randperm(700)
    rows = [order[:200].sort().values, order[200:].sort().values]
    parts = [rtn_quantize_weight(w[rows[0]], QuantScheme(4, 32)), LowRankRows.fit(w[rows[1]], LowRankFormat(16, 4))]
    tiered = RowTieredWeight.from_parts(rows, parts)
    dense = tiered.dequantize()
    for n_tokens in (1, 3, 20):  # kernels (when built) for few tokens, the batched path for more
        x = torch.randn(n_tokens, 128)
        with torch.inference_mode():
            y = tiered.matmul(x)
        reference = x @ dense.T
        torch.testing.assert_close(y, reference, rtol=0.02, atol=0.06 * float(reference.abs().mean()))  # int8 activations
        # The low-rank rows come out of their own float path: exact.
        torch.testing.assert_close(y[:, rows[1]], reference[:, rows[1]], rtol=1e-4, atol=1e-4)
    ids = torch.tensor([order[0], order[500], order[699]])
    torch.testing.assert_close(tiered.dequantize(ids), dense[ids], rtol=1e-5, atol=1e-6)
    assert "rank 16" in repr(tiered)


def test_lowrank_format_is_validated():
    with pytest.raises(ValueError, match="rank must be a multiple of 8"):
        LowRankFormat(12)
    with pytest.raises(RecipeError, match="'lr:rank:bits'"):
        MixedPrecision(formats=("lr:16",))
    with pytest.raises(RecipeError, match="at least one 'bits:group_size' grid"):
        MixedPrecision(formats=("lr:16:4",))


@pytest.fixture
def tiny_gemma(tmp_path):
    path = write_tiny_model(tmp_path / "g.gguf", TinyConfig(arch="gemma3", dim=128, hidden_dim=256, n_layers=2))
    return edgelm.load(path)


def test_measured_tier_damage_is_the_exact_kl_of_the_output(tiny_gemma):
    """tier_candidates' closed form (only the tier's logits change) equals the KL of full softmaxes."""
    model, _ = tiny_gemma
    vocab = model.args.vocab_size
    rare = torch.arange(vocab // 2, vocab)
    tokens = torch.randint(3, vocab // 2, (2, 48), generator=torch.Generator().manual_seed(0))  # no rare lookups
    calibration = Calibration(tokens, "random")
    head_inputs = final_hidden_states(model, calibration)
    full = model.tok_embeddings.weight.detach().float()
    hessian = output_hessian(head_inputs)
    options = tier_candidates(model, {"tok_embeddings": full}, {"t": Slot("tok_embeddings", rare)}, head_inputs,
                              hessian, ((2, 32, False),), (LowRankFormat(16, 4),), 0.0, 1.0, calibration)["t"]
    states = _head_positions(head_inputs)
    with torch.inference_mode():
        reference = torch.log_softmax(model.logits(states[None])[0].float(), -1)
    from edgelm.compress.quant.primitives import fake_quantize

    approximations = [fake_quantize(full[rare], QuantScheme(2, 32)),
                      LowRankRows.fit(full[rare], LowRankFormat(16, 4), hessian).dequantize()]
    for candidate, approx in zip(options, approximations):
        changed = full.clone()
        changed[rare] = approx
        logits = states @ changed.T
        if model.final_softcap:
            logits = torch.tanh(logits / model.final_softcap) * model.final_softcap
        logp = torch.log_softmax(logits, -1)
        kl = float((reference.exp() * (reference - logp)).sum(-1).mean())
        assert candidate.damage == pytest.approx(kl, rel=1e-3, abs=1e-7)
    assert options[1].label == "lr:16:4" and options[1].nbytes == LowRankFormat(16, 4).nbytes(rare.numel(), 128)


def test_mixed_can_make_the_rarest_tier_low_rank_and_the_directory_keeps_it(tiny_gemma, tmp_path):
    model, tokenizer = tiny_gemma
    vocab = model.args.vocab_size
    tokens = torch.randint(3, vocab // 4, (8, 64), generator=torch.Generator().manual_seed(0))
    # All at 4:32 is 4.75 bpw: only a low-rank tier brings the model under 4.6.
    step = MixedPrecision(target_bpw=4.6, embedding_tiers=(vocab // 4,), formats=("4:32", "8:32", "lr:16:4"),
                          method="gptq", low_rank_below=1.0)
    compress(model, [step], Calibration(tokens, "random"))
    weight = model.tok_embeddings.weight_q
    assert isinstance(weight, RowTieredWeight)
    kinds = [type(part).__name__ for part in weight.parts]
    assert model.mixed_precision_plan["tok_embeddings[1]"] == "lr:16:4", model.mixed_precision_plan
    assert kinds[1] == "LowRankRows"
    assert model_size(model)["bits_per_weight"] <= 4.6
    out = save_artifact(model, tokenizer, tmp_path / "lr")
    loaded, _ = edgelm.load(out)
    ids = tokens[:1, :24]
    with torch.inference_mode():
        torch.testing.assert_close(loaded(ids), model(ids), rtol=0, atol=0)
    from edgelm.runtime.engine import unsupported_reason

    assert "low-rank" in unsupported_reason(out)


def test_large_tiers_are_measured_on_a_sample_of_their_rows(tiny_gemma, monkeypatch):
    from edgelm.compress.quant import mixed

    model, _ = tiny_gemma
    vocab = model.args.vocab_size
    rare = torch.arange(vocab // 4, vocab)
    tokens = torch.randint(3, vocab // 4, (2, 48), generator=torch.Generator().manual_seed(0))
    calibration = Calibration(tokens, "random")
    head_inputs = final_hidden_states(model, calibration)
    full = model.tok_embeddings.weight.detach().float()

    def damages():
        options = tier_candidates(model, {"tok_embeddings": full}, {"t": Slot("tok_embeddings", rare)}, head_inputs,
                                  output_hessian(head_inputs), ((2, 32, False), (3, 32, False)), (), 0.0, 1.0,
                                  calibration)["t"]
        return [c.damage for c in options], [c.nbytes for c in options]

    exact, exact_bytes = damages()
    monkeypatch.setattr(mixed, "TIER_SAMPLE_ROWS", rare.numel() // 3)
    sampled, sampled_bytes = damages()
    assert sampled_bytes == exact_bytes  # the cost is the whole tier's
    for a, b in zip(sampled, exact):
        assert a == pytest.approx(b, rel=0.35)
    assert sampled[0] > sampled[1]


def test_low_rank_and_one_bit_rows_are_offered_only_to_rare_tiers(tiny_gemma):
    model, _ = tiny_gemma
    vocab = model.args.vocab_size
    rare = torch.arange(vocab // 2, vocab)
    tokens = torch.randint(3, vocab // 2, (2, 48), generator=torch.Generator().manual_seed(0))
    calibration = Calibration(tokens, "random")
    head_inputs = final_hidden_states(model, calibration)
    full = model.tok_embeddings.weight.detach().float()

    def labels(low_rank_below: float) -> list[str]:
        options = tier_candidates(model, {"tok_embeddings": full}, {"t": Slot("tok_embeddings", rare)},
                                  head_inputs, output_hessian(head_inputs), ((1, 32, True), (2, 32, True)),
                                  (LowRankFormat(16, 4),), 0.1, low_rank_below, calibration)["t"]
        return [c.label for c in options]

    assert labels(1.0) == ["1:32:fit", "2:32:fit", "lr:16:4"]  # the tier holds < 100 % of the mass: rare
    assert labels(0.0) == ["2:32:fit"]  # nothing is rarer than 0: neither 1-bit nor low-rank rows


def test_lookup_probe_measures_rare_rows_as_inputs(tmp_path):
    """Rows that never occur in calibration text still get an input damage: planted, not zero."""
    from edgelm.compress.quant.mixed import LookupProbe
    from edgelm.compress.quant.primitives import fake_quantize

    # The tiny random gemma's logits are too peaked for any KL to show: the tiny qwen2 model instead.
    model, _ = edgelm.load(write_tiny_model(tmp_path / "q.gguf", TinyConfig(arch="qwen2", dim=128, hidden_dim=256)))
    vocab = model.args.vocab_size
    rare = torch.arange(vocab // 2, vocab)
    calibration = Calibration(torch.randint(3, vocab // 2, (2, 128), generator=torch.Generator().manual_seed(0)),
                              "random")
    full = model.tok_embeddings.weight.detach().float()
    probe = LookupProbe(model, full, calibration)
    assert probe.frequency(rare) == 0.0
    assert probe(rare, full[rare]) == pytest.approx(0.0, abs=1e-6)
    coarse = probe(rare, fake_quantize(full[rare], QuantScheme(2, 32)))
    fine = probe(rare, fake_quantize(full[rare], QuantScheme(6, 32)))
    assert coarse > 4 * fine > 0
    assert isinstance(model.tok_embeddings, torch.nn.Embedding) and model.output is None  # restored
