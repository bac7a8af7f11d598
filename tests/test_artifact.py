"""edgelm model directories: exact round trip, version checks, atomic writes."""

from __future__ import annotations

import json

import pytest
import torch

import edgelm
from edgelm.compress import RTN, compress
from edgelm.errors import ModelFormatError
from edgelm.io.artifact import CONFIG, load_artifact, model_size, save_artifact
from tests.tiny_gguf import TinyConfig, write_tiny_model


@pytest.fixture(params=["gemma3", "qwen2"])
def quantized(request, tmp_path):
    path = write_tiny_model(tmp_path / "m.gguf", TinyConfig(arch=request.param, dim=128, hidden_dim=256))
    model, tokenizer = edgelm.load(path)
    recipe = [RTN(bits=4, group_size=32, ignore=("layers.1.*",))]
    return compress(model, recipe), tokenizer, recipe


def test_round_trip_is_exact(quantized, tmp_path):
    model, tokenizer, recipe = quantized
    out = save_artifact(model, tokenizer, tmp_path / "q4", recipe=[s.to_dict() for s in recipe])
    loaded, loaded_tok = edgelm.load(out)
    ids = torch.randint(3, model.args.vocab_size, (1, 24))
    with torch.inference_mode():
        torch.testing.assert_close(loaded(ids), model(ids), rtol=0, atol=0)
    assert loaded_tok.encode("hello world") == tokenizer.encode("hello world")
    config = json.loads((out / CONFIG).read_text())
    assert config["recipe"] == [{"rtn": {"bits": 4, "group_size": 32, "symmetric": False, "embedding": True,
                                         "ignore": ["layers.1.*"]}}]
    assert "layers.1.attn.wq" not in config["quantized_modules"]
    assert config["quantized_modules"]["tok_embeddings"]["kind"] == "embedding"
    assert config["stats"] == model_size(loaded)


def test_bits_per_weight_counts_everything(quantized):
    model, _, _ = quantized
    stats = model_size(model)
    # 4-bit codes with fp16 scales + uint8 zeros per 32 weights = 4.75 bpw; layer 1 stays float32.
    assert 4.75 < stats["bits_per_weight"] < 32


def test_versions_and_damage_are_named(quantized, tmp_path):
    model, tokenizer, _ = quantized
    out = save_artifact(model, tokenizer, tmp_path / "q")
    config = json.loads((out / CONFIG).read_text())
    (out / CONFIG).write_text(json.dumps({**config, "format_version": 99}))
    with pytest.raises(ModelFormatError, match="newer edgelm"):
        load_artifact(out)
    (out / CONFIG).write_text(json.dumps({**config, "format_version": 0}))
    with pytest.raises(ModelFormatError, match="older than this edgelm supports"):
        load_artifact(out)
    (out / CONFIG).write_text(json.dumps(config))
    (out / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ModelFormatError, match="cannot read"):
        load_artifact(out)
    with pytest.raises(ModelFormatError, match="without config.json"):
        edgelm.load(tmp_path)


def test_writes_are_atomic(quantized, tmp_path):
    model, tokenizer, _ = quantized
    out = save_artifact(model, tokenizer, tmp_path / "q")
    before = (out / "model.safetensors").read_bytes()

    class Unserializable:
        metadata = {"tokenizer.ggml.model": object()}

    with pytest.raises(TypeError):
        save_artifact(model, Unserializable(), tmp_path / "q")
    assert (out / "model.safetensors").read_bytes() == before  # the old artifact is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf", "q"]  # no temporary left behind
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(ModelFormatError, match="refusing to overwrite"):
        save_artifact(model, tokenizer, other)
