"""Structured pruning: a genuinely smaller dense model that keeps the important parts and still loads,
saves and runs; bad settings are named."""

from __future__ import annotations

import pytest
import torch

import edgelm
from edgelm.bench.quality import perplexity
from edgelm.compress import StructuredPrune, compress, parse_recipe
from edgelm.compress.calibration import Calibration
from edgelm.errors import EdgelmError, RecipeError
from edgelm.io.artifact import model_size, save_artifact
from edgelm.io.gguf_export import export_gguf
from tests.tiny_gguf import TinyConfig, write_tiny_model


@pytest.fixture(params=["gemma3", "qwen2"])
def tiny(request, tmp_path):
    config = TinyConfig(arch=request.param, dim=128, hidden_dim=256, n_layers=4, n_heads=4, n_kv_heads=2)
    path = write_tiny_model(tmp_path / "m.gguf", config)
    return path


def calibration_for(model, n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Calibration(torch.randint(3, model.args.vocab_size, (n, 48), generator=g), "random")


def test_the_model_gets_smaller_and_still_runs(tiny, tmp_path):
    model, tokenizer = edgelm.load(tiny)
    before = model_size(model)["parameters"]
    pruned = compress(model, [StructuredPrune(ffn_keep=0.5, heads_keep=0.5, drop_layers=1)], calibration_for(model))
    args = pruned.args
    assert (args.n_layers, args.hidden_dim, args.n_heads, args.n_kv_heads) == (3, 128, 2, 2)
    assert pruned.layers[0].ffn.w_down.weight.shape == (128, 128)
    assert pruned.layers[0].attn.wq.weight.shape[0] == 2 * args.head_dim
    assert model_size(pruned)["parameters"] < before
    ids = torch.randint(3, args.vocab_size, (1, 30))
    loaded, _ = edgelm.load(save_artifact(pruned, tokenizer, tmp_path / "small"))
    with torch.inference_mode():
        torch.testing.assert_close(loaded(ids), pruned(ids), rtol=0, atol=0)
    if args.sliding_window is not None:  # gemma3: the surviving layers keep their own window flags
        assert args.local_layers == [True, True, True]  # 4 layers < gemma's pattern of 6: all local
        export_gguf(pruned, tokenizer, tmp_path / "x.gguf", "F32")  # still the architecture's pattern
        args.local_layers = [True, False, True]
        with pytest.raises(EdgelmError, match="sliding-window pattern"):
            export_gguf(pruned, tokenizer, tmp_path / "y.gguf", "F32")


def test_importance_beats_dropping_at_random(tmp_path):
    """Keeping the channels/heads the scores pick hurts less than keeping the least important ones.
    (The tiny qwen2: the tiny gemma3's logits are too peaked for KL to tell models apart.)"""
    from edgelm.compress.prune import structured

    tiny = write_tiny_model(tmp_path / "q.gguf", TinyConfig(arch="qwen2", dim=128, hidden_dim=256, n_layers=4,
                                                          n_heads=4, n_kv_heads=2))
    reference, _ = edgelm.load(tiny)
    held_out = torch.randint(3, reference.args.vocab_size, (192,), generator=torch.Generator().manual_seed(7))
    calibration = calibration_for(reference, n=16)
    model, _ = edgelm.load(tiny)
    scores = structured.importance(model, calibration)
    good = structured.rebuild(model, [0, 1, 2, 3], 1, 96, scores)
    inverted = structured.Importance([-c for c in scores.channel], [-h for h in scores.head], scores.layer)
    bad = structured.rebuild(model, [0, 1, 2, 3], 1, 96, inverted)
    kld = {name: perplexity(m, held_out.tolist(), ctx=64, progress=False, reference=reference).kld
           for name, m in (("good", good), ("bad", bad))}
    assert kld["good"] < 0.8 * kld["bad"], kld


def test_bad_settings_are_named(tiny):
    with pytest.raises(RecipeError, match="ffn_keep and heads_keep must be in"):
        parse_recipe([{"prune_structured": {"ffn_keep": 0}}])
    model, _ = edgelm.load(tiny)
    with pytest.raises(RecipeError, match="leaves no layer"):
        compress(model, [StructuredPrune(drop_layers=4)], calibration_for(model))
    with pytest.raises(RecipeError, match="needs calibration"):
        compress(model, [StructuredPrune(ffn_keep=0.5)], None)


def test_distillation_recovers_part_of_the_loss(tmp_path):
    from edgelm.compress import DistillWeights

    tiny = write_tiny_model(tmp_path / "q.gguf", TinyConfig(arch="qwen2", dim=128, hidden_dim=256, n_layers=4,
                                                          n_heads=4, n_kv_heads=2))
    reference, _ = edgelm.load(tiny)
    calibration = calibration_for(reference, n=16)
    held_out = calibration.tokens[:4].reshape(-1).tolist()  # KD fits the calibration distribution
    kld = {}
    for steps in (0, 30):
        model, _ = edgelm.load(tiny)
        recipe = [StructuredPrune(ffn_keep=0.5, heads_keep=0.5)]
        if steps:
            recipe.append(DistillWeights(steps=steps, lr=1e-3, seq_len=48))
        torch.manual_seed(0)
        model = compress(model, recipe, calibration)
        kld[steps] = perplexity(model, held_out, ctx=48, progress=False, reference=reference).kld
    assert kld[30] < 0.7 * kld[0], kld
