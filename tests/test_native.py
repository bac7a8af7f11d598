"""The compiled decode step reproduces the eager forward pass (all three architectures, sliding window,
biases, sandwich norms) and steps aside for models it cannot run."""

from __future__ import annotations

import pytest
import torch

import edgelm
from edgelm import kernels
from edgelm.compress import RTN, compress
from edgelm.runtime.generate import decode_step, prefill
from edgelm.runtime.native import native_decoder
from tests.tiny_gguf import TinyConfig, write_tiny_model

pytestmark = pytest.mark.skipif(not kernels.available(), reason="kernels not built (no C compiler)")


def quantized_tiny(tmp_path, arch: str):
    path = write_tiny_model(tmp_path / f"{arch}.gguf", TinyConfig(arch=arch, dim=128, hidden_dim=256, n_layers=3))
    model, _ = edgelm.load(str(path))
    compress(model, RTN(bits=4, group_size=32, embedding=True))
    return model


@pytest.mark.parametrize("arch,kv_bits", [("gemma3", None), ("qwen2", None), ("llama", None), ("gemma3", 16),
                                          ("llama", 16), ("gemma3", 8), ("qwen2", 4)])
def test_native_step_matches_the_eager_forward(tmp_path, arch, kv_bits):
    model = quantized_tiny(tmp_path, arch)
    model.set_kv_bits(kv_bits)  # float16 or quantized: the step reads and writes the same values as the eager path
    prompt = list(range(3, 9))
    model.setup_caches(40)
    try:
        prefill(model, prompt)
        native = native_decoder(model)
        assert native is not None
        token = 11
        # Past gemma3's sliding window of 8: local layers must drop the oldest positions.
        for pos in range(len(prompt), 30):
            fast = native.step(token, pos)
            with torch.inference_mode():  # the same position again, eagerly (rewrites the same cache slot)
                slow = model(torch.tensor([[token]]), torch.tensor([pos]))[0, -1]
            assert (fast - slow).norm() / slow.norm() < (0.03 if kv_bits != 4 else 0.06), (arch, pos)
            token = int(slow.argmax())
    finally:
        model.clear_caches()


def test_decode_step_uses_it_and_falls_back_when_it_cannot(tmp_path):
    model = quantized_tiny(tmp_path, "qwen2")
    model.setup_caches(16)
    try:
        prefill(model, [1, 2, 3])
        assert native_decoder(model) is not None
        assert decode_step(model, 4, 3).shape == (model.args.vocab_size,)
    finally:
        model.clear_caches()
    model.set_kv_bits(8)  # a quantized KV cache runs there too
    model.setup_caches(16)
    try:
        prefill(model, [1, 2, 3])
        assert native_decoder(model) is not None
    finally:
        model.clear_caches()
    model.set_kv_bits(None)
    model.layers[1].attn.wq = torch.nn.Linear(128, model.layers[1].attn.wq.out_features)  # one float layer
    model.setup_caches(16)
    try:
        prefill(model, [1, 2, 3])
        assert native_decoder(model) is None
        assert decode_step(model, 4, 3).shape == (model.args.vocab_size,)
    finally:
        model.clear_caches()
    float_model, _ = edgelm.load(str(tmp_path / "qwen2.gguf"))  # float layers: eager
    float_model.setup_caches(16)
    try:
        assert native_decoder(float_model) is None
    finally:
        float_model.clear_caches()


@pytest.mark.parametrize("arch", ["gemma3", "qwen2"])
def test_a_batch_of_tokens_is_bit_identical_to_single_steps(tmp_path, arch):
    """Speculative verification scores k + 1 tokens at once; greedy output stays the target's only if
    those logits are exactly what single steps give."""
    model = quantized_tiny(tmp_path, arch)
    tokens = [7, 3, 19, 4, 11, 8, 2, 5, 9, 13]  # 10 > the kernels' row block: the head is split too
    model.setup_caches(40)
    try:
        prefill(model, [1, 2, 3, 4, 5, 6])
        native = native_decoder(model)
        batch = native.steps(tokens, 6)
        singles = torch.stack([native.step(token, 6 + i) for i, token in enumerate(tokens)])
    finally:
        model.clear_caches()
    assert torch.equal(batch, singles)


@pytest.mark.parametrize("bits", [8, 4])
def test_the_step_quantizes_cache_entries_exactly_as_the_eager_cache(bits):
    from edgelm.compress.quant.primitives import compute_params, pack, quantize
    from edgelm.kernels import _library
    from edgelm.runtime.kv_cache import kv_scheme

    scheme = kv_scheme(bits, 128)
    x = torch.randn(1, 128, generator=torch.Generator().manual_seed(bits)) * 3
    x[0, :32] = x[0, :32].abs()  # a group with no negative value: its zero point is 0
    x[0, 64:96] *= 1e-4  # scales far below fp16's normal range (subnormal halves)
    scale, zero = compute_params(x, scheme)
    expected = pack(quantize(x, scale, zero, scheme), bits)
    codes = torch.zeros(1, 128 * bits // 8, dtype=torch.uint8)
    scales = torch.zeros(1, 4, dtype=torch.float16)
    zeros = torch.zeros(1, 4, dtype=torch.uint8)
    _library().ek_kv_quantize(x.data_ptr(), 128, bits, 32, codes.data_ptr(), scales.data_ptr(), zeros.data_ptr())
    assert torch.equal(codes, expected)
    assert torch.equal(scales, scale.half()) and torch.equal(zeros, zero.to(torch.uint8))
