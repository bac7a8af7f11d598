"""Calibration data and the block-by-block runner used by data-aware compression."""

from __future__ import annotations

import pytest
import torch

import edgelm
from edgelm.compress.calibration import (BlockRunner, Calibration, calibration_from_file, calibration_from_model,
                                         capture_inputs, linear_layers)
from edgelm.errors import EdgelmError
from tests.tiny_gguf import TinyConfig, write_tiny_model


@pytest.fixture(scope="module", params=["gemma3", "qwen2"])
def tiny(request, tmp_path_factory):
    path = write_tiny_model(tmp_path_factory.mktemp("c") / "m.gguf", TinyConfig(arch=request.param, n_layers=7))
    return edgelm.load(path)


def test_block_runner_reproduces_the_forward_pass(tiny):
    model, _ = tiny
    tokens = torch.randint(3, model.args.vocab_size, (3, 20))
    runner = BlockRunner(model, Calibration(tokens, "test"), batch_size=2)
    for i in range(len(model.layers)):
        runner.advance(i)
    with torch.inference_mode():
        expected = model(tokens)
        ours = model.logits(runner.final_hidden())
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4)


def test_capture_inputs_sees_every_linear_of_a_block(tiny):
    model, _ = tiny
    runner = BlockRunner(model, Calibration(torch.randint(3, model.args.vocab_size, (2, 10)), "test"))
    seen: dict[str, int] = {}
    with capture_inputs(linear_layers(model.layers[0]), lambda name, x: seen.__setitem__(name, x.shape[0])):
        runner.run(0)
    assert set(seen) == {"attn.wq", "attn.wk", "attn.wv", "attn.wo", "ffn.w_gate", "ffn.w_up", "ffn.w_down"}
    assert all(rows == 20 for rows in seen.values())


def test_calibration_from_file_and_model(tiny, tmp_path):
    model, tokenizer = tiny
    text = tmp_path / "calib.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    calib = calibration_from_file(tokenizer, text, n_samples=5, seq_len=16)
    assert calib.tokens.shape == (5, 16)
    if tokenizer.add_bos:
        assert (calib.tokens[:, 0] == tokenizer.bos_id).all()
    with pytest.raises(EdgelmError, match="fewer than one calibration window"):
        calibration_from_file(tokenizer, text, seq_len=100_000)
    with pytest.raises(EdgelmError, match="not found"):
        calibration_from_file(tokenizer, tmp_path / "missing.txt")
    generated = calibration_from_model(model, tokenizer, n_samples=2, seq_len=12)
    assert generated.tokens.shape == (2, 12)
