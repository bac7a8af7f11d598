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
    assert config["recipe"] == [{"rtn": {"bits": 4, "group_size": 32, "symmetric": False, "fit": False, "embedding": True,
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


def test_codes_are_stored_in_the_kernels_layout_and_older_directories_still_load(quantized, tmp_path):
    """Version 3 stores codes as the kernels read them (no conversion or second copy at load); version-2
    (plane layout chunk by chunk) and version-1 (dense packing) directories load too, all the same model."""
    from safetensors.torch import load_file, save_file

    from edgelm.kernels.layout import from_planes, to_chunk_planes

    model, tokenizer, _ = quantized
    out = save_artifact(model, tokenizer, tmp_path / "q")
    config = json.loads((out / CONFIG).read_text())
    assert config["format_version"] == 4
    assert config["quantized_modules"]["layers.0.attn.wq"]["layout"] == "planes"
    loaded, _ = load_artifact(out)
    weight = loaded.layers[0].attn.wq.weight_q
    assert weight.layout == "planes"
    km = weight.kernel()
    if km is not None:
        assert km.planes.data_ptr() == weight.packed.data_ptr()  # the kernels read the stored codes in place

    ids = torch.randint(3, model.args.vocab_size, (1, 12))

    stored = load_file(out / "model.safetensors")

    def save_codes_as(pack_as):
        """The directory's weights again, every packed weight stored as pack_as(codes, bits)."""
        state = dict(stored)
        for name, spec in config["quantized_modules"].items():
            if spec.get("layout") == "planes":
                key = f"{name}.weight_q.packed"
                state[key] = pack_as(from_planes(stored[key], spec["bits"], spec["in_features"]), spec["bits"])
        save_file(state, out / "model.safetensors")

    # the same directory as version 2 wrote it: each row's planes chunk by chunk
    save_codes_as(to_chunk_planes)
    (out / CONFIG).write_text(json.dumps({**config, "format_version": 2}))
    v2, _ = load_artifact(out)
    assert v2.layers[0].attn.wq.weight_q.layout == "chunk-planes"
    with torch.inference_mode():
        torch.testing.assert_close(v2(ids), loaded(ids), rtol=0, atol=0)

    # and as version 1 wrote it: dense row-wise packing, no layout keys
    from edgelm.compress.quant.primitives import pack

    save_codes_as(pack)
    for spec in config["quantized_modules"].values():
        spec.pop("layout", None)
    (out / CONFIG).write_text(json.dumps({**config, "format_version": 1}))
    old, _ = load_artifact(out)
    assert old.layers[0].attn.wq.weight_q.layout == "dense"
    with torch.inference_mode():
        torch.testing.assert_close(old(ids), loaded(ids), rtol=0, atol=0)
