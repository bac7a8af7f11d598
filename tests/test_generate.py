"""Generation and the CLI on tiny models: determinism, streaming text, stops, limits, one-line errors."""

from __future__ import annotations

import subprocess
import sys

import pytest

import edgelm
from edgelm.errors import GenerationError
from edgelm.runtime.generate import GenerationStats, generate_step, stream_generate
from edgelm.runtime.sampling import Sampler, SamplingParams
from tests.tiny_gguf import TinyConfig, write_tiny_model

GREEDY = SamplingParams(temperature=0.0)


@pytest.fixture(scope="module", params=["gemma3", "qwen2"])
def tiny_model(request, tmp_path_factory):
    path = write_tiny_model(tmp_path_factory.mktemp("m") / f"{request.param}.gguf", TinyConfig(arch=request.param))
    model, tokenizer = edgelm.load(path)
    tokenizer.eos_ids = frozenset()  # random weights: never stop early, so lengths are predictable
    return path, model, tokenizer


def test_greedy_is_deterministic_and_streams_the_decoded_text(tiny_model):
    _, model, tokenizer = tiny_model
    prompt = tokenizer.encode("hello world")
    ids_a = list(generate_step(model, prompt, Sampler(GREEDY), max_tokens=20))
    ids_b = list(generate_step(model, prompt, Sampler(GREEDY), max_tokens=20))
    assert ids_a == ids_b and len(ids_a) == 20
    responses = list(stream_generate(model, tokenizer, prompt, max_tokens=20, sampling=GREEDY))
    assert "".join(r.text for r in responses) == tokenizer.decode(ids_a)
    assert responses[-1].finish_reason == "length"
    assert all(r.finish_reason is None for r in responses[:-1])


def test_seeded_sampling_reproduces(tiny_model):
    _, model, tokenizer = tiny_model
    params = SamplingParams(temperature=1.0, seed=123)
    a = edgelm.generate(model, tokenizer, "hello", max_tokens=12, sampling=params)
    b = edgelm.generate(model, tokenizer, "hello", max_tokens=12, sampling=params)
    assert a == b


def test_stop_string_cuts_the_output(tiny_model):
    _, model, tokenizer = tiny_model
    full = edgelm.generate(model, tokenizer, "hello", max_tokens=24, sampling=GREEDY)
    stop = full[len(full) // 2: len(full) // 2 + 2]
    assert stop.strip(), "the tiny model should produce visible text"
    cut = list(stream_generate(model, tokenizer, "hello", max_tokens=24, sampling=GREEDY, stop=[stop]))
    assert "".join(r.text for r in cut) == full[: full.index(stop)]
    assert cut[-1].finish_reason == "stop"


def test_stats_are_filled(tiny_model):
    _, model, tokenizer = tiny_model
    stats = GenerationStats()
    list(generate_step(model, tokenizer.encode("hello"), Sampler(GREEDY), max_tokens=8, stats=stats))
    assert stats.generation_tokens == 8 and stats.prompt_tokens == len(tokenizer.encode("hello"))
    assert stats.prompt_tps > 0 and stats.generation_tps > 0 and stats.first_token_seconds > 0


def test_prompt_beyond_context_is_refused(tiny_model):
    _, model, tokenizer = tiny_model
    with pytest.raises(GenerationError, match="exceeds the model's context"):
        list(generate_step(model, [5] * 250, Sampler(GREEDY), max_tokens=10))
    with pytest.raises(GenerationError, match="prompt is empty"):
        list(generate_step(model, [], Sampler(GREEDY), max_tokens=3))


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    # CLI tests start a Python process each: one architecture is enough for them.
    return write_tiny_model(tmp_path_factory.mktemp("cli") / "qwen2.gguf", TinyConfig(arch="qwen2"))


def edgelm_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgelm", *args], capture_output=True, text=True, timeout=300)


def test_cli_generate_and_perplexity(tiny_path, tmp_path):
    path = tiny_path
    out = edgelm_cli("generate", "-m", str(path), "-p", "hello", "-n", "6", "--temp", "0", "-v")
    assert out.returncode == 0, out.stderr
    assert "generation: 6 tokens" in out.stderr or "finish: stop" in out.stderr
    text = tmp_path / "eval.txt"
    text.write_bytes(b"hello world, the quick brown fox jumps over the lazy dog.\r\n" * 20)
    out = edgelm_cli("perplexity", "-m", str(path), "-f", str(text), "--ctx", "32", "--chunks", "2", "--json")
    assert out.returncode == 0, out.stderr
    assert '"tokens_scored": 30' in out.stdout  # 2 chunks x (32 - 16 - 1)


@pytest.mark.parametrize("args, message", [
    (["generate", "-m", "no-such-model", "-p", "x"], "no-such-model"),
    (["generate", "-p", "x", "--temp", "-1"], "temperature must be >= 0"),
    (["perplexity", "-m", "{model}", "-f", "missing.txt"], "missing.txt: no such file"),
    (["perplexity", "-m", "{model}", "-f", "{model}", "--ctx", "7"], "--ctx must be an even number"),
])
def test_cli_errors_are_one_line(tiny_path, args, message):
    path = tiny_path
    out = edgelm_cli(*[a.replace("{model}", str(path)) for a in args])
    assert out.returncode == 1
    assert "Traceback" not in out.stderr
    lines = [line for line in out.stderr.splitlines() if line.startswith("edgelm: error:")]
    assert len(lines) == 1 and message in lines[0], out.stderr


def test_cli_help_does_not_import_torch():
    code = ("import sys\nfrom edgelm.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip().endswith("False"), out.stdout + out.stderr
    for command in ("generate", "chat", "perplexity", "bench", "quantize", "compress", "eval", "prune", "distill",
                    "export", "pull", "models"):
        code = ("import sys\nfrom edgelm.cli import main\ntry:\n    main(['" + command + "', '--help'])\n"
                "except SystemExit:\n    pass\nprint('torch' in sys.modules)")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
        assert "usage: edgelm " + command in out.stdout, out.stderr
        assert out.stdout.strip().endswith("False"), command + " --help imported torch"
