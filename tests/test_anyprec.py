"""Any-precision: nested codes, every precision from one store, error falls as bits rise."""

from __future__ import annotations

import pytest
import torch

import edgelm
from edgelm.compress import AnyPrecision, compress, set_precision
from edgelm.compress.quant.anyprec import AnyPrecisionLinear, AnyPrecisionWeight
from edgelm.compress.quant.primitives import QuantScheme, fake_quantize, sqnr_db
from edgelm.errors import RecipeError
from edgelm.io.artifact import model_size
from tests.tiny_gguf import TinyConfig, write_tiny_model


def test_codes_are_nested_prefixes():
    weight = AnyPrecisionWeight.quantize(torch.randn(16, 128), max_bits=8, group_size=64)
    for bits in range(2, 8):
        assert torch.equal(weight.codes(bits), weight.codes(bits + 1) >> 1)


def test_each_precision_is_close_to_direct_rtn():
    w = torch.randn(64, 256)
    stored = AnyPrecisionWeight.quantize(w, max_bits=8, group_size=64)
    previous = None
    for bits in (3, 4, 5, 6, 8):
        derived = sqnr_db(w, stored.at_bits(bits).dequantize())
        direct = sqnr_db(w, fake_quantize(w, QuantScheme(bits, 64)))
        assert derived > direct - 1.5  # double rounding costs well under a bit
        assert previous is None or derived > previous + 4  # ~6 dB per bit
        previous = derived
    assert sqnr_db(w, stored.at_bits(8).dequantize()) == pytest.approx(
        sqnr_db(w, fake_quantize(w, QuantScheme(8, 64))), abs=0.5)


def test_storage_is_one_max_bit_model():
    stored = AnyPrecisionWeight.quantize(torch.randn(32, 256), max_bits=8, group_size=64)
    assert stored.planes.numel() == 8 * 32 * 256 // 8


def test_model_switches_precision(tmp_path):
    path = write_tiny_model(tmp_path / "m.gguf", TinyConfig(arch="qwen2", dim=128, hidden_dim=256))
    reference, _ = edgelm.load(path)
    model, _ = edgelm.load(path)
    compress(model, [AnyPrecision(bits=3)])
    assert isinstance(model.layers[0].attn.wq, AnyPrecisionLinear)
    ids = torch.randint(3, model.args.vocab_size, (1, 24))
    errors = {}
    with torch.inference_mode():
        target = reference(ids)
        for bits in (3, 4, 6, 8):
            set_precision(model, bits)
            errors[bits] = float((model(ids) - target).norm() / target.norm())
    assert errors[3] > errors[4] > errors[6] > errors[8]
    with pytest.raises(RecipeError, match="holds 1 to 8 bits"):
        set_precision(model, 9)
    with pytest.raises(RecipeError, match="min_bits <= bits"):
        AnyPrecision(bits=2, min_bits=3)


def test_model_directory_holds_every_precision(tmp_path):
    """One saved any-precision store; `load(..., bits=N)` / `--bits N` picks the precision at load time."""
    import subprocess
    import sys

    from edgelm.errors import ModelFormatError
    from edgelm.io.artifact import save_artifact

    path = write_tiny_model(tmp_path / "m.gguf", TinyConfig(arch="qwen2", dim=128, hidden_dim=256))
    model, tokenizer = edgelm.load(path)
    compress(model, [AnyPrecision(max_bits=8, min_bits=3, bits=4, group_size=32)])
    out = save_artifact(model, tokenizer, tmp_path / "ap")
    ids = torch.randint(3, model.args.vocab_size, (1, 16))
    stored = model_size(model)["bits_per_weight"]
    outputs = {}
    for bits in (3, 4, 8):
        set_precision(model, bits)
        loaded, _ = edgelm.load(out, bits=bits)
        with torch.inference_mode():
            outputs[bits] = loaded(ids)
            torch.testing.assert_close(outputs[bits], model(ids), rtol=0, atol=0)
        assert model_size(loaded)["bits_per_weight"] == stored  # the store, whatever the active precision
    assert not torch.equal(outputs[3], outputs[8])
    with pytest.raises(ModelFormatError, match="holds 2 to 8 bits"):
        edgelm.load(out, bits=9)
    # Written with its recipe (as the commands do), the directory offers min_bits and up only.
    step = AnyPrecision(max_bits=8, min_bits=3, bits=4, group_size=32)
    with_recipe = save_artifact(model, tokenizer, tmp_path / "ap-recipe", recipe=[step.to_dict()])
    with pytest.raises(ModelFormatError, match="holds 3 to 8 bits per weight, not 2"):
        edgelm.load(with_recipe, bits=2)
    with pytest.raises(ModelFormatError, match="not an any-precision model"):
        edgelm.load(save_artifact(edgelm.load(path)[0], tokenizer, tmp_path / "plain"), bits=4)
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    done = subprocess.run([sys.executable, "-m", "edgelm", "perplexity", "-m", str(out), "--bits", "3", "-f",
                           str(text), "-c", "16", "--chunks", "2"], capture_output=True, text=True)
    assert done.returncode == 0 and "PPL = " in done.stdout, done.stderr
