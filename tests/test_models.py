"""Model code on tiny random-weight GGUF models: loading, KV cache, sliding window, llama.cpp parity."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgelm.io.gguf import GGUFFile
from edgelm.models import load_gguf_model
from tests.tiny_gguf import TinyConfig, write_tiny_model

ARCHS = ["gemma3", "qwen2", "llama"]


def tiny(tmp_path, arch: str, **overrides):
    path = write_tiny_model(tmp_path / f"tiny-{arch}.gguf", TinyConfig(arch=arch, **overrides))
    return path, load_gguf_model(GGUFFile(path))


def tokens(n: int, vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(10, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", ARCHS)
def test_cached_decode_matches_full_forward(tmp_path, arch):
    # Prefill + one-token decode steps through the static KV cache must reproduce a full forward pass,
    # also past the sliding window (tiny window of 8, 40 tokens).
    _, model = tiny(tmp_path, arch)
    ids = tokens(40, model.args.vocab_size)
    with torch.inference_mode():
        full = model(ids)[0]
        model.setup_caches(48)
        steps = [model(ids[:, :13], torch.arange(13))[0]]
        for pos in range(13, 40):
            steps.append(model(ids[:, pos:pos + 1], torch.tensor([pos]))[0])
        model.clear_caches()
    torch.testing.assert_close(torch.cat(steps), full, rtol=1e-4, atol=1e-4)


def test_sliding_window_limits_what_local_layers_see(tmp_path):
    # All layers local (no global layer in 2): a token influences positions at most
    # n_layers * (window - 1) later. Changing token 0 must leave later positions untouched.
    path = write_tiny_model(tmp_path / "swa.gguf", TinyConfig(arch="gemma3", n_layers=2, sliding_window=4))
    model = load_gguf_model(GGUFFile(path))
    assert [model.args.is_local(i) for i in range(2)] == [True, True]
    ids = tokens(20, model.args.vocab_size)
    changed = ids.clone()
    changed[0, 0] = (ids[0, 0] + 1) % model.args.vocab_size
    with torch.inference_mode():
        a, b = model(ids)[0], model(changed)[0]
    reach = 2 * (4 - 1)
    assert not torch.allclose(a[reach], b[reach])  # still within reach
    torch.testing.assert_close(a[reach + 1:], b[reach + 1:])


def test_gemma3_layer_pattern_and_rope_bases(tmp_path):
    _, model = tiny(tmp_path, "gemma3", n_layers=12)
    assert [i for i in range(12) if not model.args.is_local(i)] == [5, 11]
    assert model.args.rope_base == 1_000_000.0 and model.args.rope_base_local == 10000.0
    assert model.embed_scale == pytest.approx(64 ** 0.5)


@pytest.mark.parametrize("weight_type", ["F16", "Q8_0", "Q4_0", "Q5_0"])
def test_quantized_storage_types_load_close_to_float(tmp_path, weight_type):
    _, ref = tiny(tmp_path, "qwen2")
    path = write_tiny_model(tmp_path / "q.gguf", TinyConfig(arch="qwen2", weight_type=weight_type))
    model = load_gguf_model(GGUFFile(path))
    w_ref, w_q = ref.layers[0].ffn.w_up.weight.detach(), model.layers[0].ffn.w_up.weight.detach()
    rel = float((w_ref - w_q).norm() / w_ref.norm())
    assert rel < {"F16": 1e-3, "Q8_0": 1e-2, "Q5_0": 0.06, "Q4_0": 0.12}[weight_type]
    assert rel > 0 or weight_type == "F16"


def test_untied_output_is_loaded(tmp_path):
    _, model = tiny(tmp_path, "qwen2", tied=False)
    assert model.output is not None and not model.args.tie_embeddings


@pytest.mark.parametrize("drop, error, message", [
    ("tokenizer.ggml.tokens", "TokenizerError", "tokenizer.ggml.tokens"),
    ("tokenizer.ggml.model", "TokenizerError", "tokenizer.ggml.model"),
    ("qwen2.block_count", "ModelFormatError", "qwen2.block_count"),
])
def test_missing_keys_are_named_errors(tmp_path, drop, error, message):
    import edgelm
    from edgelm import errors

    path = write_tiny_model(tmp_path / "damaged.gguf", TinyConfig(arch="qwen2"), drop_keys=(drop,))
    with pytest.raises(getattr(errors, error), match=message) as info:
        edgelm.load(path)
    assert str(path) in str(info.value)


def test_unknown_architecture_is_named(tmp_path):
    import edgelm
    from edgelm.errors import UnsupportedArchitecture

    path = write_tiny_model(tmp_path / "mamba.gguf", TinyConfig(arch="qwen2"),
                            extra_metadata={"general.architecture": "mamba"})
    with pytest.raises(UnsupportedArchitecture, match="architecture 'mamba' is not supported"):
        edgelm.load(path)


@pytest.mark.llama_cpp
@pytest.mark.parametrize("arch", ARCHS)
def test_logits_match_llama_cpp(tmp_path, arch):
    """llama.cpp, loading the same tiny file, is an independent reference for the whole forward pass."""
    llama_cpp = pytest.importorskip("llama_cpp")
    path, model = tiny(tmp_path, arch)
    ids = tokens(24, model.args.vocab_size, seed=1)[0].tolist()
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_batch=64, logits_all=True, verbose=False,
                          n_threads=2)
    llm.eval(ids)
    reference = np.array(llm.scores[: len(ids)])
    with torch.inference_mode():
        ours = model(torch.tensor([ids]))[0].numpy()
    # llama.cpp rounds some intermediates (F16 KV cache, 8-bit activations for quantized matmuls).
    np.testing.assert_allclose(ours, reference, atol=2e-2 * np.abs(reference).max())
    assert (ours.argmax(-1) == reference.argmax(-1)).mean() >= 0.9
