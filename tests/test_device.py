"""The device path: a packed model made dense for a device computes what its packed weights mean, and
asking for a GPU that is not there is a one-line error. (The CUDA runs themselves need a GPU; on the CPU
the same code path runs with a float32 or bfloat16 dense model.)"""

from __future__ import annotations

import pytest
import torch

import edgelm
from edgelm.compress import RTN, compress
from edgelm.compress.quant.modules import QuantizedEmbedding, QuantizedLinear
from edgelm.errors import DeviceError
from edgelm.runtime.device import resolve_device, to_device
from edgelm.runtime.generate import generate_step
from edgelm.runtime.sampling import Sampler, SamplingParams
from tests.test_generate import edgelm_cli
from tests.tiny_gguf import TinyConfig, write_tiny_model

GREEDY = SamplingParams(temperature=0)
PROMPT = [1, 17, 42, 99]


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("device") / "qwen2.gguf",
                            TinyConfig(arch="qwen2", dim=128, hidden_dim=256, seed=1))


def packed(path):
    model, _ = edgelm.load(str(path))
    compress(model, RTN(bits=4, group_size=32, embedding=True))
    return model


def test_dense_float32_computes_what_the_packed_weights_mean(tiny_path):
    model = packed(tiny_path)
    tokens = torch.tensor([PROMPT])
    with torch.enable_grad():  # the packed model's own float path: dequantized weights, no int8 activations
        reference = model(tokens).detach()
    dense = to_device(model, "cpu", torch.float32)
    assert not any(isinstance(m, (QuantizedLinear, QuantizedEmbedding)) for m in dense.modules())
    with torch.inference_mode():
        logits = dense(tokens)
    torch.testing.assert_close(logits, reference, rtol=1e-5, atol=1e-5)


def test_bfloat16_model_generates_with_a_bfloat16_cache(tiny_path):
    model = to_device(packed(tiny_path), "cpu", torch.bfloat16)
    assert {p.dtype for name, p in model.named_parameters() if "norm" not in name} == {torch.bfloat16}
    assert model.norm.weight.dtype == torch.float32  # norms and rotary tables stay float32
    reference = list(generate_step(to_device(packed(tiny_path), "cpu", torch.float32), PROMPT, Sampler(GREEDY), 8))
    model.setup_caches(16)
    assert model.layers[0].attn.kv_cache.k.dtype == torch.bfloat16
    model.clear_caches()
    tokens = list(generate_step(model, PROMPT, Sampler(GREEDY), 8))
    assert len(tokens) == 8
    assert tokens[0] == reference[0]  # the first token is clear-cut on this tiny model; later ones may drift


def test_auto_and_cpu_resolve_without_a_gpu():
    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu_names_the_fix():
    with pytest.raises(DeviceError, match="--device cpu"):
        resolve_device("cuda")


def test_unknown_device_is_refused():
    with pytest.raises(DeviceError, match="use cpu, cuda"):
        resolve_device("tpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cli_device_cuda_without_a_gpu_is_one_line(tiny_path):
    out = edgelm_cli("generate", "-m", str(tiny_path), "-p", "hello", "-n", "2", "--device", "cuda")
    assert out.returncode == 1
    assert "Traceback" not in out.stderr
    lines = [line for line in out.stderr.splitlines() if line.startswith("edgelm: error:")]
    assert len(lines) == 1 and "--device cpu" in lines[0], out.stderr


def test_cli_device_auto_runs_here(tiny_path):
    out = edgelm_cli("generate", "-m", str(tiny_path), "-p", "hello", "-n", "4", "--temp", "0", "--device", "auto")
    assert out.returncode == 0, out.stderr
    plain = edgelm_cli("generate", "-m", str(tiny_path), "-p", "hello", "-n", "4", "--temp", "0")
    if not torch.cuda.is_available():
        assert out.stdout == plain.stdout  # auto is the CPU path on a machine without a GPU


def test_speculative_decoding_runs_on_dense_models(tiny_path, tmp_path):
    from edgelm.runtime.speculative import SpeculativeStats, speculative_generate_step

    draft_path = write_tiny_model(tmp_path / "draft.gguf", TinyConfig(arch="qwen2", dim=64, hidden_dim=128,
                                                                      n_layers=2, seed=2))
    target = to_device(packed(tiny_path), "cpu", torch.float32)
    draft = to_device(packed(draft_path), "cpu", torch.float32)
    plain = list(generate_step(target, PROMPT, Sampler(GREEDY), 12))
    stats = SpeculativeStats()
    tokens = list(speculative_generate_step(target, draft, PROMPT, Sampler(GREEDY), 12, 3, spec_stats=stats))
    assert tokens == plain and stats.rounds > 0


def test_packed_weights_off_the_host_never_reach_the_kernels(tiny_path):
    weight = packed(tiny_path).layers[0].attn.wq.weight_q
    assert weight.kernel() is not None
    weight.to("meta")  # any device but the CPU: no pointers handed to C, PyTorch computes instead
    assert weight.kernel() is None
