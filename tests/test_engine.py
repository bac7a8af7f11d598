"""The kernels-only runtime: a model directory run without PyTorch gives the PyTorch model's compiled step's
logits bit for bit, prefills close to the PyTorch prefill, and refuses what it cannot run with a clear error."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import edgelm
from edgelm import kernels
from edgelm.compress import RTN, compress
from edgelm.compress.quant.gptq import quantize_rows
from edgelm.compress.quant.modules import QuantizedEmbedding
from edgelm.compress.quant.primitives import QuantScheme
from edgelm.compress.quant.rtn import rtn_quantize_weight
from edgelm.errors import GenerationError, ModelFormatError
from edgelm.io.artifact import model_size, save_artifact
from edgelm.runtime.engine import KernelEngine, load_engine, unsupported_reason
from edgelm.runtime.generate import generate_step, prefill
from edgelm.runtime.native import native_decoder
from edgelm.runtime.sampling import Sampler, SamplingParams
from tests.tiny_gguf import TinyConfig, write_tiny_model

pytestmark = pytest.mark.skipif(not kernels.available(), reason="kernels not built (no C compiler)")


def tiny_directory(tmp_path, arch: str, tiered: bool = False, head_dim: int | None = None):
    """A 4-bit tiny model written as a model directory; `tiered`: its embedding in two row tiers (8-bit
    symmetric and 3-bit), as mixed precision stores gemma-3-270m's."""
    config = TinyConfig(arch=arch, dim=128, hidden_dim=256, n_layers=3, head_dim=head_dim)
    gguf = write_tiny_model(tmp_path / f"{arch}.gguf", config)
    model, tokenizer = edgelm.load(str(gguf))
    embedding = model.tok_embeddings.weight.detach().clone()
    compress(model, RTN(bits=4, group_size=32, embedding=True))
    if tiered:
        rows = torch.randperm(embedding.shape[0], generator=torch.Generator().manual_seed(0))
        frequent, rare = rows[:100].sort().values, rows[100:].sort().values
        plan = [(frequent, QuantScheme(8, 32, symmetric=True)), (rare, QuantScheme(3, 64))]
        model.tok_embeddings = QuantizedEmbedding(quantize_rows(embedding, plan, rtn_quantize_weight))
    return save_artifact(model, tokenizer, tmp_path / f"{arch}-dir")


@pytest.mark.parametrize("arch,kv_bits,tiered,head_dim", [
    ("gemma3", 16, True, None), ("qwen2", 32, False, None), ("llama", 16, False, 64), ("gemma3", 8, False, 64),
    ("qwen2", 4, True, None)])
def test_decoding_is_bit_identical_to_the_pytorch_models_compiled_step(tmp_path, arch, kv_bits, tiered, head_dim):
    path = tiny_directory(tmp_path, arch, tiered, head_dim)
    engine = KernelEngine.load(path, context=40, kv_bits=kv_bits, threads=2)
    model, _ = edgelm.load(path)
    model.set_kv_bits(kv_bits)
    model.setup_caches(40)
    try:
        native = native_decoder(model)
        assert native is not None
        prompt = [5, 9, 3, 14, 2, 7]
        # The same prompt through the same step (one batch), then single steps past gemma3's window of 8.
        assert np.array_equal(engine.steps(prompt), native.steps(prompt, 0).numpy())
        token = 11
        for pos in range(len(prompt), 30):
            ours = engine.decode(token)
            assert np.array_equal(ours, native.step(token, pos).numpy()), (arch, pos)
            token = int(ours.argmax())
    finally:
        model.clear_caches()


@pytest.mark.parametrize("arch", ["gemma3", "qwen2"])
def test_prefill_agrees_with_the_pytorch_prefill(tmp_path, arch):
    """The engine prefills with int8 activations through the compiled step, PyTorch with float matmuls:
    close logits, the same choice; chunk boundaries change nothing."""
    path = tiny_directory(tmp_path, arch, tiered=True)
    engine = KernelEngine.load(path, context=64)
    model, _ = edgelm.load(path)
    model.setup_caches(64)
    prompt = list(np.random.default_rng(1).integers(3, 200, size=37))
    try:
        expected = prefill(model, prompt).numpy()
    finally:
        model.clear_caches()
    ours = engine.prefill(prompt)
    assert np.linalg.norm(ours - expected) / np.linalg.norm(expected) < 0.05
    assert ours.argmax() == expected.argmax()
    assert engine.pos == len(prompt)
    assert np.array_equal(engine.prefill(prompt, chunk=5), ours)  # chunks of 5 (a batch of 16 + a tail)


def test_it_runs_without_importing_pytorch_and_reports_the_stored_bytes(tmp_path):
    path = tiny_directory(tmp_path, "gemma3", tiered=True)
    model, _ = edgelm.load(path)
    script = f"""
import json, sys
from edgelm.runtime.engine import KernelEngine
engine = KernelEngine.load({str(path)!r}, context=32)
logits = engine.prefill([2, 5, 9])
token = int(engine.decode(int(logits.argmax())).argmax())
print(json.dumps({{"torch": "torch" in sys.modules, "token": token, "bytes": engine.weight_bytes}}))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["torch"] is False
    assert 0 <= result["token"] < model.args.vocab_size
    assert result["bytes"] == model_size(model)["bytes"]


def test_what_it_cannot_run_is_refused_with_the_reason(tmp_path):
    gguf = write_tiny_model(tmp_path / "tiny.gguf", TinyConfig(arch="qwen2", dim=128, hidden_dim=256))
    assert unsupported_reason(gguf) == "not an edgelm model directory"
    with pytest.raises(ModelFormatError, match="edgelm.load"):
        KernelEngine.load(gguf)
    model, tokenizer = edgelm.load(str(gguf))
    compress(model, RTN(bits=4, group_size=32, embedding=True))
    model.layers[1].attn.wq = torch.nn.Linear(128, model.layers[1].attn.wq.out_features)  # one float layer
    path = save_artifact(model, tokenizer, tmp_path / "one-float-layer")
    assert unsupported_reason(path) == "layers.1.attn.wq is not a packed linear"
    with pytest.raises(ModelFormatError, match="layers.1.attn.wq"):
        KernelEngine.load(path)


def test_bad_positions_and_tokens_are_generation_errors(tmp_path):
    engine = KernelEngine.load(tiny_directory(tmp_path, "llama"), context=8)
    with pytest.raises(GenerationError, match="vocabulary"):
        engine.prefill([1, 10**6])
    with pytest.raises(GenerationError, match="empty"):
        engine.prefill([])
    with pytest.raises(GenerationError, match="KV cache of 8"):
        engine.prefill(list(range(1, 10)))
    engine.prefill(list(range(1, 8)))
    engine.decode(3)
    with pytest.raises(GenerationError, match="KV cache of 8"):
        engine.decode(3)
    with pytest.raises(GenerationError, match="--kv-bits"):
        KernelEngine.load(tiny_directory(tmp_path, "llama"), kv_bits=12)


def test_generate_and_chat_run_a_directory_without_pytorch(tmp_path):
    """`edgelm generate` on a model directory: the kernels-only runtime, sampling in numpy, no PyTorch."""
    path = tiny_directory(tmp_path, "qwen2")
    script = f"""
import sys
from edgelm.cli import main
code = main(["generate", "-m", {str(path)!r}, "-p", "hello", "-n", "6", "--temp", "0", "-t", "1"])
code += main(["generate", "-m", {str(path)!r}, "-p", "hello", "-n", "6", "--seed", "3"])
print("TORCH" if "torch" in sys.modules else "NO-TORCH", code)
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "NO-TORCH 0"


def test_generation_on_the_engine_follows_its_own_greedy_steps(tmp_path):
    path = tiny_directory(tmp_path, "gemma3", tiered=True)
    engine, tokenizer = load_engine(path, pull=False)
    engine.set_kv_bits(8)
    prompt = tokenizer.encode("hello world")
    tokens = list(generate_step(engine, prompt, Sampler(SamplingParams(temperature=0)), max_tokens=12))
    assert engine.cache_len == 0  # caches released after generation, as for PyTorch models
    engine.setup_caches(len(prompt) + 12)
    expected = [int(engine.prefill(prompt).argmax())]
    for _ in range(11):
        expected.append(int(engine.decode(expected[-1]).argmax()))
    assert tokens == expected
    text = edgelm.generate(engine, tokenizer, "hello world", max_tokens=12, sampling=SamplingParams(temperature=0))
    ids = []
    for token in tokens:
        if token in tokenizer.eos_ids:
            break
        ids.append(token)
    assert text == tokenizer.decode(ids)
    # Speculative decoding runs on engines too: a second engine of the same directory accepts every draft.
    with pytest.raises(GenerationError, match="its own draft"):
        edgelm.generate(engine, tokenizer, "hi", draft=engine, max_tokens=4)
    twin, _ = load_engine(path, pull=False)
    twin.set_kv_bits(8)
    assert edgelm.generate(engine, tokenizer, "hello world", max_tokens=12, sampling=SamplingParams(temperature=0),
                           draft=twin, num_draft=3) == text
