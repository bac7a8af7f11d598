"""GGUF reading: values and tensors round-trip, and every kind of damage gives a typed, named error."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from edgelm.errors import ModelFormatError, UnsupportedTensorType
from edgelm.io.gguf import GGUFFile


def write_small(path, extra_tensor_type: str = "Q8_0"):
    import gguf
    from gguf.quants import quantize

    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_string("general.name", "small")
    w.add_uint32("llama.block_count", 2)
    w.add_float32("llama.rope.freq_base", 500000.0)
    w.add_bool("tokenizer.ggml.add_bos_token", True)
    w.add_array("tokenizer.ggml.tokens", ["<s>", "a", "ü", "▁b"])
    w.add_array("tokenizer.ggml.scores", [0.0, -1.5, -2.5, -3.0])
    f32 = rng.normal(size=(3, 64)).astype(np.float32)
    w.add_tensor("f32.weight", f32)
    w.add_tensor("f16.weight", f32.astype(np.float16))
    qtype = gguf.GGMLQuantizationType[extra_tensor_type]
    w.add_tensor("q.weight", quantize(f32, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return f32


def test_metadata_and_tensors_round_trip(tmp_path):
    path = tmp_path / "small.gguf"
    values = write_small(path)
    g = GGUFFile(path)
    assert g.architecture == "llama"
    assert g.metadata["general.name"] == "small"
    assert g.metadata["llama.block_count"] == 2
    assert g.metadata["llama.rope.freq_base"] == 500000.0
    assert g.metadata["tokenizer.ggml.add_bos_token"] is True
    assert g.metadata["tokenizer.ggml.tokens"] == ["<s>", "a", "ü", "▁b"]
    assert g.metadata["tokenizer.ggml.scores"] == [0.0, -1.5, -2.5, -3.0]
    assert g.tensor_info("f32.weight").shape == (3, 64)
    np.testing.assert_array_equal(g.dequantize("f32.weight"), values)
    np.testing.assert_allclose(g.dequantize("f16.weight"), values, atol=2e-3)
    np.testing.assert_allclose(g.dequantize("q.weight"), values, atol=0.05)
    assert g.dequantize("f32.weight").flags.writeable


def test_agrees_with_reference_reader(tmp_path):
    import gguf

    path = tmp_path / "small.gguf"
    write_small(path)
    ours, ref = GGUFFile(path), gguf.GGUFReader(path)
    for t in ref.tensors:
        assert ours.tensor_info(t.name).n_bytes == t.n_bytes
        np.testing.assert_array_equal(ours.tensor_info(t.name).data.reshape(-1).view(np.uint8),
                                      np.asarray(t.data).reshape(-1).view(np.uint8))
    assert ours.metadata["tokenizer.ggml.tokens"] == ref.fields["tokenizer.ggml.tokens"].contents()


def header_and_tensor_field(path, name: str) -> int:
    """Byte offset just past a tensor's name in the tensor-info table."""
    data = path.read_bytes()
    encoded = name.encode()
    pos = data.index(struct.pack("<Q", len(encoded)) + encoded)
    return pos + 8 + len(encoded)


@pytest.mark.parametrize("damage, message", [
    (lambda b: b"GGML" + b[4:], "bad magic"),
    (lambda b: b[:20], "too short"),
    (lambda b: b[:60], "unexpected end of file"),
    (lambda b: b[:-100], "spans bytes"),
    (lambda b: b[:4] + struct.pack("<I", 7) + b[8:], "version 7"),
])
def test_damaged_files_raise_named_errors(tmp_path, damage, message):
    good = tmp_path / "good.gguf"
    write_small(good)
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(damage(good.read_bytes()))
    with pytest.raises(ModelFormatError, match=message) as info:
        GGUFFile(bad)
    assert str(bad) in str(info.value)


def test_wrong_tensor_offset(tmp_path):
    path = tmp_path / "offset.gguf"
    write_small(path)
    data = bytearray(path.read_bytes())
    at = header_and_tensor_field(path, "q.weight") + 4 + 2 * 8 + 4  # n_dims, 2 dims, type -> offset
    data[at:at + 8] = struct.pack("<Q", 1 << 40)
    path.write_bytes(bytes(data))
    with pytest.raises(ModelFormatError, match="tensor 'q.weight' spans bytes"):
        GGUFFile(path)


def test_unknown_tensor_type(tmp_path):
    path = tmp_path / "type.gguf"
    write_small(path)
    data = bytearray(path.read_bytes())
    at = header_and_tensor_field(path, "q.weight") + 4 + 2 * 8
    data[at:at + 4] = struct.pack("<I", 250)
    path.write_bytes(bytes(data))
    with pytest.raises(UnsupportedTensorType, match="'q.weight' has unknown ggml type id 250"):
        GGUFFile(path)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(ModelFormatError, match="no such file"):
        GGUFFile(tmp_path / "nope.gguf")
    with pytest.raises(ModelFormatError, match="is a directory"):
        GGUFFile(tmp_path)


def test_missing_tensor_and_key_are_named(tmp_path):
    path = tmp_path / "small.gguf"
    write_small(path)
    g = GGUFFile(path)
    with pytest.raises(ModelFormatError, match="tensor 'blk.0.attn_q.weight' is missing"):
        g.dequantize("blk.0.attn_q.weight")
    with pytest.raises(ModelFormatError, match="'llama.context_length' is missing"):
        g.require("llama.context_length")
    with pytest.raises(ModelFormatError, match="has shape"):
        g.dequantize("f32.weight", expected_shape=(64, 3))
