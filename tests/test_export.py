"""GGUF export: llama.cpp loads what edgelm writes and scores it like edgelm does."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import edgelm
from edgelm.bench.quality import perplexity, perplexity_of_file
from edgelm.compress import RTN, compress
from edgelm.errors import EdgelmError
from edgelm.io.artifact import save_artifact
from edgelm.io.gguf import GGUFFile
from edgelm.io.gguf_export import export_gguf
from tests.tiny_gguf import TinyConfig, write_tiny_model


@pytest.fixture(params=["gemma3", "qwen2"])
def tiny(request, tmp_path):
    return write_tiny_model(tmp_path / "m.gguf", TinyConfig(arch=request.param, dim=128, hidden_dim=256))


def test_export_round_trips_through_our_reader(tiny, tmp_path):
    model, tokenizer = edgelm.load(tiny)
    out = export_gguf(model, tokenizer, tmp_path / "f32.gguf", "F32")
    again, tok2 = edgelm.load(out)
    ids = torch.randint(3, model.args.vocab_size, (1, 20))
    with torch.inference_mode():
        torch.testing.assert_close(again(ids), model(ids))
    assert tok2.encode("hello world") == tokenizer.encode("hello world")
    assert GGUFFile(out).metadata["general.file_type"] == 0


@pytest.mark.llama_cpp
def test_llama_cpp_scores_the_export_like_edgelm(tmp_path):
    pytest.importorskip("llama_cpp")
    from edgelm.bench.peer import LlamaCppScorer

    # qwen2: the tiny gemma's random logits are so peaked that its PPL (~1e52) amplifies float noise.
    tiny = write_tiny_model(tmp_path / "m.gguf", TinyConfig(arch="qwen2", dim=128, hidden_dim=256))
    model, tokenizer = edgelm.load(tiny)
    quantized = compress(model, [RTN(bits=8, group_size=32)])
    directory = save_artifact(quantized, tokenizer, tmp_path / "q8")
    subprocess.run([sys.executable, "-m", "edgelm", "export", "-m", str(directory), "--type", "Q8_0",
                    "-o", str(tmp_path / "q8.gguf")], check=True, capture_output=True, timeout=300)
    ours, _ = edgelm.load(tmp_path / "q8.gguf")
    tokens = torch.randint(3, model.args.vocab_size, (256,)).tolist()
    ppl_ours = perplexity(ours, tokens, ctx=64, progress=False)
    ppl_llama = perplexity(LlamaCppScorer(tmp_path / "q8.gguf", ctx=64), tokens, ctx=64, progress=False)
    assert ppl_llama.ppl == pytest.approx(ppl_ours.ppl, rel=0.01)


def test_export_refuses_bad_types(tiny, tmp_path):
    model, tokenizer = edgelm.load(tiny)
    with pytest.raises(EdgelmError, match="choose one of"):
        export_gguf(model, tokenizer, tmp_path / "x.gguf", "Q3_K")
    assert not (tmp_path / "x.gguf").exists()


@pytest.mark.slow
@pytest.mark.llama_cpp
def test_real_model_q8_export_matches_llama_cpp_within_one_percent(gemma_path, wiki_test, tmp_path):
    pytest.importorskip("llama_cpp")
    from edgelm.bench.peer import LlamaCppScorer

    model, tokenizer = edgelm.load(gemma_path)
    compress(model, [RTN(bits=8, group_size=32, symmetric=True)])
    out = export_gguf(model, tokenizer, tmp_path / "gemma-q8.gguf", "Q8_0")
    ours = perplexity_of_file(model, tokenizer, wiki_test, ctx=512, chunks=2, progress=False)
    theirs = perplexity_of_file(LlamaCppScorer(out, ctx=512), tokenizer, wiki_test, ctx=512, chunks=2,
                                progress=False)
    assert theirs.ppl == pytest.approx(ours.ppl, rel=0.01)
