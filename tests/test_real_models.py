"""Real models from the registry (slow): perplexity against llama.cpp, generation, chat, damaged files.

Reference perplexities were computed with llama.cpp itself (llama-cpp-python 0.3.36, logits of every
position, llama-perplexity's chunking) on wiki.test.raw, ctx 512, first 4 chunks. llama.cpp quantizes
activations to 8 bits in its quantized matmuls while edgelm computes in float32, so the two differ by
about 0.3 % (llama.cpp's own F32 run of the dequantized weights scores like edgelm); 1 % is the bound.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

import edgelm
from edgelm.bench.quality import perplexity_of_file, read_eval_text
from edgelm.commands.chat import encode_chat
from edgelm.errors import ModelFormatError
from edgelm.runtime.generate import generate_step
from edgelm.runtime.sampling import Sampler, SamplingParams

pytestmark = pytest.mark.slow

LLAMA_CPP_PPL_4_CHUNKS = {"gemma-3-270m": 15.0618, "qwen2.5-coder-0.5b-instruct": 31.4888}
GREEDY = SamplingParams(temperature=0.0)


@pytest.fixture(scope="module")
def gemma(gemma_path):
    return edgelm.load(gemma_path)


@pytest.fixture(scope="module")
def qwen(qwen_path):
    return edgelm.load(qwen_path)


def test_gemma_perplexity_tokens_as_llama_perplexity(gemma, wiki_test):
    _, tokenizer = gemma
    # llama-perplexity drops the file's final newline: 295,172 tokens including BOS.
    assert len(tokenizer.encode(read_eval_text(wiki_test))) == 295_172


@pytest.mark.parametrize("name", ["gemma-3-270m", "qwen2.5-coder-0.5b-instruct"])
def test_perplexity_matches_llama_cpp(name, gemma, qwen, wiki_test):
    model, tokenizer = gemma if name == "gemma-3-270m" else qwen
    result = perplexity_of_file(model, tokenizer, wiki_test, ctx=512, chunks=4, progress=False)
    assert result.tokens_scored == 4 * 255
    assert result.ppl == pytest.approx(LLAMA_CPP_PPL_4_CHUNKS[name], rel=0.01)
    assert 0 < result.stderr < result.ppl * 0.2


def test_gemma_greedy_generation_is_deterministic_and_sensible(gemma):
    model, tokenizer = gemma
    prompt = "The Eiffel Tower is located in the city of"
    a = edgelm.generate(model, tokenizer, prompt, max_tokens=12, sampling=GREEDY)
    b = edgelm.generate(model, tokenizer, prompt, max_tokens=12, sampling=GREEDY)
    assert a == b
    assert a.startswith(" Paris")
    counting = edgelm.generate(model, tokenizer, "One, two, three, four,", max_tokens=6, sampling=GREEDY)
    assert counting.startswith(" five, six")


def test_gemma_generation_beyond_the_sliding_window(gemma, wiki_test):
    # 600 prompt tokens: local layers must only see the last 512 positions. The cached decode must agree
    # with a full forward pass over the same tokens at every generated position.
    import torch

    model, tokenizer = gemma
    prompt = tokenizer.encode(read_eval_text(wiki_test)[:4000])[:600]
    tokens = list(generate_step(model, prompt, Sampler(GREEDY), max_tokens=4))
    with torch.inference_mode():
        full = model(torch.tensor([prompt + tokens[:-1]]), logits_at=slice(len(prompt) - 1, None))[0]
    assert full.argmax(-1).tolist() == tokens


def test_qwen_chat_answers_and_stops_at_end_of_turn(qwen):
    model, tokenizer = qwen
    messages = [{"role": "user", "content": "Write a Python function add(a, b) that returns a + b."}]
    responses = list(edgelm.stream_generate(model, tokenizer, encode_chat(tokenizer, messages),
                                            max_tokens=120, sampling=GREEDY))
    text = "".join(r.text for r in responses)
    assert "def add(a, b)" in text
    assert responses[-1].finish_reason == "stop"  # <|im_end|> ended the turn
    assert "<|im_end|>" not in text


def test_cli_chat_reads_turns_from_stdin(qwen_path):
    out = subprocess.run([sys.executable, "-m", "edgelm", "chat", "-m", str(qwen_path), "--temp", "0", "-n", "40"],
                         input="What is 2 + 3? Answer with one number.\n/exit\n", capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr
    assert "5" in out.stdout


def test_truncated_real_model_is_a_format_error(gemma_path, tmp_path):
    truncated = tmp_path / "truncated.gguf"
    with open(gemma_path, "rb") as src:
        truncated.write_bytes(src.read(50_000_000))
    with pytest.raises(ModelFormatError, match="spans bytes"):
        edgelm.load(truncated)
    out = subprocess.run([sys.executable, "-m", "edgelm", "generate", "-m", str(truncated), "-p", "hi"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert str(truncated) in out.stderr and "truncated or corrupt" in out.stderr
