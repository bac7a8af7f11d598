"""Source grids: ggml blocks decode to edgelm's (codes, scale, zero) form exactly; keeping them is lossless;
mixed precision offers them; row-tiered embeddings round-trip through model directories."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import edgelm
from edgelm.compress import KeepSource, MixedPrecision, Wanda, compress
from edgelm.compress.calibration import Calibration
from edgelm.compress.quant.modules import QuantizedEmbedding, QuantizedLinear, RowTieredWeight
from edgelm.io.artifact import model_size, save_artifact
from edgelm.io.ggml_grids import DECODERS, decode_grid
from tests.tiny_gguf import TinyConfig, write_tiny_model

# Byte offsets of the fp16 fields of each block type (random bytes there could be NaN or huge).
FP16_FIELDS = {"Q8_0": [0], "Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q4_K": [0, 2], "Q6_K": [208]}


@pytest.mark.parametrize("type_name", sorted(DECODERS))
def test_grids_match_ggml_dequantization(type_name):
    import gguf
    from gguf.quants import dequantize

    block_bytes, block_weights, _ = DECODERS[type_name]
    rows, cols = 6, 2 * max(block_weights, 256)
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, (rows, cols // block_weights, block_bytes), dtype=np.uint8)
    for offset in FP16_FIELDS[type_name]:
        raw[..., offset:offset + 2] = rng.uniform(0.001, 0.1, raw.shape[:2]).astype(np.float16)[..., None].view(np.uint8)
    raw = raw.reshape(rows, -1)
    expected = dequantize(raw, gguf.GGMLQuantizationType[type_name]).reshape(rows, cols)
    grid = decode_grid(type_name, raw, (rows, cols))
    np.testing.assert_allclose(grid.dequantize(), expected, rtol=1e-5, atol=1e-6)
    assert grid.codes.max() < 2 ** grid.bits
    assert decode_grid("F32", raw, (rows, cols)) is None


@pytest.fixture
def q5_model(tmp_path):
    path = write_tiny_model(tmp_path / "m.gguf", TinyConfig(arch="qwen2", dim=128, hidden_dim=256,
                                                          weight_type="Q5_0"))
    return edgelm.load(path)


def test_keeping_the_source_is_lossless(q5_model, tmp_path):
    model, tokenizer = q5_model
    ids = torch.randint(3, model.args.vocab_size, (1, 20), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        before = model(ids)
    compress(model, [KeepSource()])
    assert isinstance(model.layers[0].attn.wq, QuantizedLinear)
    assert model.layers[0].attn.wq.weight_q.scheme.bits == 5
    with torch.inference_mode():
        torch.testing.assert_close(model(ids), before, rtol=0, atol=1e-5)
    assert model_size(model)["bits_per_weight"] < 6.5  # Q5_0 everywhere: 5.5, plus float norms
    loaded, _ = edgelm.load(save_artifact(model, tokenizer, tmp_path / "kept"))
    with torch.inference_mode():
        torch.testing.assert_close(loaded(ids), before, rtol=0, atol=1e-5)


def test_changed_weights_do_not_get_the_old_grid(q5_model):
    model, _ = q5_model
    calibration = Calibration(torch.randint(3, model.args.vocab_size, (4, 32)), "random")
    compress(model, [Wanda(sparsity=0.5), KeepSource()], calibration)
    assert not isinstance(model.layers[0].attn.wq, QuantizedLinear)  # pruned: the file no longer describes it
    assert isinstance(model.tok_embeddings, QuantizedEmbedding)  # never pruned: kept


def test_mixed_precision_keeps_source_grids_and_tiers_the_embedding(tmp_path):
    path = write_tiny_model(tmp_path / "m.gguf", TinyConfig(arch="qwen2", dim=128, hidden_dim=256,
                                                          weight_type="Q8_0"))
    model, tokenizer = edgelm.load(path)
    n_vocab = model.args.vocab_size
    tokens = torch.randint(3, n_vocab, (8, 64), generator=torch.Generator().manual_seed(0))
    step = MixedPrecision(target_bpw=6.0, embedding_tiers=(n_vocab // 8, n_vocab // 2), method="rtn")
    compress(model, [step], Calibration(tokens, "random"))
    plan = model.mixed_precision_plan
    assert "source" in plan.values()
    assert {f"tok_embeddings[{k}]" for k in range(3)} <= set(plan)
    weight = model.tok_embeddings.weight_q
    assert isinstance(weight, RowTieredWeight) and len(weight.parts) == 3
    assert sorted(torch.bincount(weight.tier.long()).tolist()) == sorted(
        [n_vocab // 8, n_vocab // 2 - n_vocab // 8, n_vocab - n_vocab // 2])
    assert model_size(model)["bits_per_weight"] <= 6.0
    # Row lookups and the full matrix agree, and the directory round trip is exact.
    rows = torch.tensor([5, 3, n_vocab - 1, 0])
    torch.testing.assert_close(weight.dequantize(rows), weight.dequantize()[rows], rtol=0, atol=0)
    loaded, _ = edgelm.load(save_artifact(model, tokenizer, tmp_path / "mixed"))
    ids = tokens[:1, :24]
    with torch.inference_mode():
        torch.testing.assert_close(loaded(ids), model(ids), rtol=0, atol=0)


@pytest.mark.slow
def test_real_gemma_keeps_its_q4_k_m_grids_losslessly(gemma_path, monkeypatch):
    from edgelm.compress.quant import modules

    # The weights are what is lossless: compare on the float path, not the kernels' int8 activations.
    monkeypatch.setattr(modules, "KERNEL_MAX_TOKENS", 0)
    model, _ = edgelm.load(gemma_path)
    ids = torch.randint(3, 30000, (1, 48), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        before = torch.log_softmax(model(ids, logits_at=slice(-8, None)).float(), -1)
    compress(model, [KeepSource()])
    kinds = {type(m).__name__ for m in model.modules()}
    assert "Linear" not in kinds and "Embedding" not in kinds  # every matrix came from the file
    # Q8_0 embedding, Q5_0/Q8_0/Q4_K/Q6_K layers: 7.42 bits per weight (the file: 7.55 with its metadata).
    assert 7.3 < model_size(model)["bits_per_weight"] < 7.5
    with torch.inference_mode():
        after = torch.log_softmax(model(ids, logits_at=slice(-8, None)).float(), -1)
    kld = float((before.exp() * (before - after)).sum(-1).mean())
    assert kld < 1e-4


def test_inference_loads_a_quantized_gguf_on_its_own_grids(tmp_path):
    """generate/chat/bench load a quantized GGUF as packed layers (compiled kernels, no float copy); the
    result is the float model's, as keeping the source is."""
    from edgelm.runtime.generate import generate_step
    from edgelm.runtime.sampling import Sampler, SamplingParams

    path = write_tiny_model(tmp_path / "m.gguf", TinyConfig(arch="qwen2", dim=128, hidden_dim=256,
                                                          weight_type="Q5_0"))
    float_model, _ = edgelm.load(path)
    packed_model, _ = edgelm.load(path, keep_quantized=True)
    assert isinstance(packed_model.layers[0].attn.wq, QuantizedLinear)
    assert packed_model.layers[0].attn.wq.bias is not None  # qwen2's q/k/v biases are loaded with the rest
    assert isinstance(packed_model.tok_embeddings, QuantizedEmbedding)
    assert model_size(packed_model)["bits_per_weight"] < 6.5
    ids = torch.randint(3, float_model.args.vocab_size, (1, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(packed_model(ids), float_model(ids), rtol=0, atol=1e-5)
    prompt = [1, 5, 9, 13]
    greedy = Sampler(SamplingParams(temperature=0))
    assert len(list(generate_step(packed_model, prompt, greedy, max_tokens=6))) == 6
