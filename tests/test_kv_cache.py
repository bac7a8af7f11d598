"""Quantized KV cache: the cached path equals the fake-quantized one, error and size shrink as expected."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import edgelm
from edgelm.errors import GenerationError
from edgelm.models.base import KVCache
from edgelm.runtime.kv_cache import QuantizedKVCache, kv_scheme
from tests.tiny_gguf import TinyConfig, write_tiny_model


@pytest.fixture(scope="module", params=["gemma3", "qwen2"])
def tiny(request, tmp_path_factory):
    path = write_tiny_model(tmp_path_factory.mktemp("kv") / "m.gguf", TinyConfig(arch=request.param))
    return path, edgelm.load(path)[0]


def decode_all(model, ids, prefill=10):
    with torch.inference_mode():
        model.setup_caches(ids.shape[1])
        out = [model(ids[:, :prefill], torch.arange(prefill))[0]]
        for pos in range(prefill, ids.shape[1]):
            out.append(model(ids[:, pos:pos + 1], torch.tensor([pos]))[0])
        model.clear_caches()
    return torch.cat(out)


@pytest.mark.parametrize("bits", [16, 8, 4])
def test_cached_decode_equals_fake_quantized_forward(tiny, bits):
    _, model = tiny
    ids = torch.randint(3, model.args.vocab_size, (1, 30), generator=torch.Generator().manual_seed(0))
    model.set_kv_bits(bits)
    try:
        cached = decode_all(model, ids)
        with torch.inference_mode():
            full = model(ids)[0]
    finally:
        model.set_kv_bits(None)
    # Single-token matmuls differ from batched ones in the last float bits, which can move a value across a
    # rounding boundary and change one code by one step; anything more systematic shows in the mean.
    difference = (cached - full).abs()
    assert float(difference.mean()) < 1e-3 and float(difference.max()) < 0.05


def test_error_grows_as_bits_shrink(tiny):
    _, model = tiny
    ids = torch.randint(3, model.args.vocab_size, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        reference = model(ids)[0]
        error = {}
        for bits in (16, 8, 4):
            model.set_kv_bits(bits)
            error[bits] = float((model(ids)[0] - reference).norm() / reference.norm())
        model.set_kv_bits(32)
        assert torch.equal(model(ids)[0], reference)
        model.set_kv_bits(None)
    # (Relative logit error rather than KL: the tiny gemma's random logits are too peaked for a KL.)
    assert 0 < error[16] < error[8] / 4 and error[8] < error[4] / 2 and error[8] < 0.01


def test_cache_bytes_shrink():
    shape = dict(batch=1, n_kv_heads=2, max_len=128, head_dim=64)
    floats = sum(b.numel() * b.element_size() for b in KVCache(**shape, dtype=torch.float32).buffers())
    halves = sum(b.numel() * b.element_size() for b in KVCache(**shape, dtype=torch.float16).buffers())
    int8 = QuantizedKVCache(**shape, scheme=kv_scheme(8, 64)).nbytes
    int4 = QuantizedKVCache(**shape, scheme=kv_scheme(4, 64)).nbytes
    assert int4 < int8 < floats / 3 and halves == floats // 2
    assert kv_scheme(16, 64) is None and kv_scheme(32, 64) is None  # float caches
    with pytest.raises(GenerationError, match="--kv-bits must be one of 32, 16, 8, 4"):
        kv_scheme(3, 64)


def test_cli_kv_bits(tiny):
    path, _ = tiny
    out = subprocess.run([sys.executable, "-m", "edgelm", "generate", "-m", str(path), "-p", "hello", "-n", "5",
                          "--temp", "0", "--kv-bits", "4"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
