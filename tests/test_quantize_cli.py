"""`edgelm quantize` -> model directory -> `edgelm eval` / `generate`, on a tiny model."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import edgelm
from edgelm.bench.quality import perplexity
from tests.tiny_gguf import TinyConfig, write_tiny_model


def edgelm_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgelm", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("q") / "qwen2.gguf", TinyConfig(arch="qwen2"))


def test_quantize_eval_generate(tiny, tmp_path):
    out = tmp_path / "q4"
    done = edgelm_cli("quantize", "-m", tiny, "--method", "rtn", "--bits", "4", "--group-size", "32", "-o", out)
    assert done.returncode == 0, done.stderr
    assert "bits per weight" in done.stdout
    text = tmp_path / "eval.txt"
    text.write_bytes(b"hello world, the quick brown fox jumps over the lazy dog.\r\n" * 20)
    done = edgelm_cli("eval", "-m", out, "-f", text, "--ctx", "32", "--chunks", "2", "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["reference"] == str(tiny)
    assert 0 < result["kld"] < 1 and 0.5 < result["top1_agreement"] <= 1
    assert 4.5 < result["bits_per_weight"] < 6  # 4-bit codes + scales/zeros per 32, float norms
    done = edgelm_cli("generate", "-m", out, "-p", "hello", "-n", "4", "--temp", "0")
    assert done.returncode == 0, done.stderr


def test_evaluating_on_the_calibration_text_warns(tiny, tmp_path):
    """The directory records what it was calibrated on (by content); scoring it on that text says so."""
    calib, held_out = tmp_path / "calib.txt", tmp_path / "held_out.txt"
    calib.write_bytes(b"the quick brown fox jumps over the lazy dog, again and again.\n" * 40)
    held_out.write_bytes(b"a different text about other things entirely, for scoring.\n" * 40)
    out = tmp_path / "gptq"
    done = edgelm_cli("quantize", "-m", tiny, "--method", "gptq", "--bits", "4", "--group-size", "32",
                      "--calib", calib, "--calib-samples", "4", "--calib-seq-len", "32", "-o", out)
    assert done.returncode == 0, done.stderr
    [record] = json.loads((out / "config.json").read_text())["calibration"]
    assert record["source"] == str(calib) and (record["samples"], record["seq_len"]) == (4, 32)
    copy = tmp_path / "renamed.txt"  # the same text under another name is still the same text
    copy.write_bytes(calib.read_bytes())
    for text, warned in ((copy, True), (held_out, False)):
        for command in ("perplexity", "eval"):
            done = edgelm_cli(command, "-m", out, "-f", text, "--ctx", "32", "--chunks", "1")
            assert done.returncode == 0, done.stderr
            assert ("calibrated on" in done.stderr) == warned, (command, text, done.stderr)


def test_kld_is_zero_against_itself(tiny):
    model, tokenizer = edgelm.load(tiny)
    tokens = torch.randint(3, model.args.vocab_size, (64,)).tolist()
    result = perplexity(model, tokens, ctx=32, progress=False, reference=model)
    assert result.kld == pytest.approx(0, abs=1e-6) and result.top1_agreement == 1.0
    assert result.reference_ppl == pytest.approx(result.ppl)


@pytest.mark.parametrize("args, message", [
    (["--method", "rnt"], "unknown compression method 'rnt'"),
    (["--bits", "7"], "bits must be one of"),
    (["--method", "mixed"], "--method mixed needs --target-bpw"),
    (["--method", "anyprec", "--symmetric"], "--method anyprec does not take --symmetric"),
    (["--method", "rtn", "--target-bpw", "4"], "--method rtn does not take --target-bpw"),
    (["--method", "mixed", "--target-bpw", "4", "--bits", "3"], "--method mixed does not take --bits"),
    (["--method", "gptq", "--min-bits", "3"], "--method gptq does not take --min-bits"),
    (["--method", "anyprec", "--min-bits", "5", "--bits", "4"], "need 2 <= min_bits <= bits"),
    (["--calib-samples", "0", "--method", "gptq"], "--calib-samples must be a positive integer"),
    (["--calib-seq-len", "-3", "--method", "gptq"], "--calib-seq-len must be a positive integer"),
])
def test_quantize_errors_are_one_line(tiny, tmp_path, args, message):
    done = edgelm_cli("quantize", "-m", tiny, *args, "-o", tmp_path / "x")
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert message in done.stderr
    assert not (tmp_path / "x").exists()


def test_quantize_anyprec_and_mixed(tiny, tmp_path):
    """The two methods whose fields differ from rtn/gptq/awq: one stored any-precision model that loads at
    several precisions, and a bits-per-weight budget met for the whole model."""
    done = edgelm_cli("quantize", "-m", tiny, "--method", "anyprec", "--bits", "4", "--group-size", "32",
                      "-o", tmp_path / "ap")
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "ap" / "config.json").read_text())["recipe"][0]["anyprec"]["max_bits"] == 8
    ids = torch.randint(3, 200, (1, 16), generator=torch.Generator().manual_seed(0))
    errors = []
    with torch.inference_mode():
        reference = edgelm.load(tiny)[0](ids).float()
        for bits in (3, 8):
            model, _ = edgelm.load(tmp_path / "ap", bits=bits)
            errors.append(float((model(ids).float() - reference).abs().mean()))
    assert errors[1] < errors[0]  # 8-bit codes are closer to the float model than their 3-bit prefixes
    done = edgelm_cli("quantize", "-m", tiny, "--method", "mixed", "--target-bpw", "5", "--calib-samples", "4",
                      "--calib-seq-len", "32", "-o", tmp_path / "mixed")
    assert done.returncode == 0, done.stderr
    model, _ = edgelm.load(tmp_path / "mixed")
    from edgelm.io.artifact import model_size

    assert 4.75 <= model_size(model)["bits_per_weight"] <= 5.0


def test_a_bad_output_path_fails_before_any_work(tiny, tmp_path):
    """-o naming a file, or a directory that holds other things, is refused at once (not after compressing);
    nothing is written there."""
    a_file = tmp_path / "notes.txt"
    a_file.write_text("keep me")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "other.txt").write_text("keep me too")
    for out, message in ((a_file, "exists and is a file"), (busy, "is not an edgelm model directory")):
        # data-free GPTQ would spend its time generating calibration samples before writing anything
        done = edgelm_cli("quantize", "-m", tiny, "--method", "gptq", "-o", out)
        assert done.returncode == 1 and message in done.stderr and "Traceback" not in done.stderr, done.stderr
        assert "calibration samples" not in done.stderr
    assert a_file.read_text() == "keep me" and sorted(p.name for p in busy.iterdir()) == ["other.txt"]
    done = edgelm_cli("export", "-m", tiny, "--type", "Q8_0", "-o", busy)
    assert done.returncode == 1 and "is a directory" in done.stderr and "Traceback" not in done.stderr


def test_compress_with_a_yaml_recipe(tiny, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("- rtn: {bits: 8, group_size: 32, ignore: ['layers.0.*']}\n")
    done = edgelm_cli("compress", "-m", tiny, "--recipe", recipe, "-o", tmp_path / "out")
    assert done.returncode == 0, done.stderr
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["recipe"][0]["rtn"]["bits"] == 8
    recipe.write_text("- rtn: {bitz: 8}\n")
    done = edgelm_cli("compress", "-m", tiny, "--recipe", recipe, "-o", tmp_path / "bad")
    assert done.returncode == 1 and "no field 'bitz' (did you mean 'bits'?)" in done.stderr
    recipe.write_text("- rtn: {bits: [8\n")
    done = edgelm_cli("compress", "-m", tiny, "--recipe", recipe, "-o", tmp_path / "bad")
    assert done.returncode == 1 and "not valid YAML" in done.stderr


def test_prune_command(tiny, tmp_path):
    done = edgelm_cli("prune", "-m", tiny, "--method", "magnitude", "--sparsity", "2:4", "-o", tmp_path / "p")
    assert done.returncode == 0, done.stderr
    model, _ = edgelm.load(tmp_path / "p")
    weight = model.layers[0].ffn.w_up.weight.reshape(-1, 4)
    assert ((weight == 0).sum(-1) == 2).all()
    done = edgelm_cli("prune", "-m", tiny, "--method", "magnitude", "--sparsity", "3:2", "-o", tmp_path / "x")
    assert done.returncode == 1 and "Traceback" not in done.stderr
    # Long steps show progress on stderr: here data-free calibration, then Wanda block by block.
    done = edgelm_cli("prune", "-m", tiny, "--method", "wanda", "--sparsity", "0.5", "--calib-samples", "2",
                      "--calib-seq-len", "16", "-o", tmp_path / "w")
    assert done.returncode == 0, done.stderr
    assert "calibration samples: 100%" in done.stderr and "wanda: 100%" in done.stderr


def test_structured_prune_command(tiny, tmp_path):
    done = edgelm_cli("prune", "-m", tiny, "--method", "structured", "--ffn-keep", "0.5", "--drop-layers", "1",
                      "--calib-samples", "4", "--calib-seq-len", "32", "-o", tmp_path / "s")
    assert done.returncode == 0, done.stderr
    source, _ = edgelm.load(tiny)
    model, _ = edgelm.load(tmp_path / "s")
    assert model.args.n_layers == source.args.n_layers - 1
    assert model.args.hidden_dim == source.args.hidden_dim // 2


def test_distill_command_improves_a_quantized_directory(tiny, tmp_path):
    q3 = tmp_path / "q3"
    assert edgelm_cli("quantize", "-m", tiny, "--method", "rtn", "--bits", "3", "--group-size", "32",
                      "-o", q3).returncode == 0
    calib = tmp_path / "calib.txt"
    calib.write_text("the quick brown fox jumps over the lazy dog and runs far away. " * 80)
    done = edgelm_cli("distill", "-m", q3, "--method", "scales", "--steps", "40", "--lr", "0.01", "--calib", calib,
                      "--calib-samples", "8", "--calib-seq-len", "64", "-o", tmp_path / "dwq")
    assert done.returncode == 0, done.stderr
    reference, tokenizer = edgelm.load(tiny)
    ids = tokenizer.encode(calib.read_text())[:256]
    kld = {name: perplexity(edgelm.load(tmp_path / name)[0], ids, ctx=64, progress=False, reference=reference).kld
           for name in ("q3", "dwq")}
    assert kld["dwq"] < kld["q3"], kld
    config = json.loads((tmp_path / "dwq" / "config.json").read_text())
    assert [next(iter(step)) for step in config["recipe"]] == ["rtn", "distill"]
    assert config["source"] == str(tiny)
    done = edgelm_cli("distill", "-m", q3, "--method", "nope", "-o", tmp_path / "x")
    assert done.returncode != 0 and "Traceback" not in done.stderr
    # A float model has no scales to train: refused before any (data-free) calibration is generated.
    done = edgelm_cli("distill", "-m", tiny, "--teacher", tiny, "--steps", "1", "-o", tmp_path / "y")
    assert done.returncode == 1 and "has no quantized layers" in done.stderr, done.stderr
    assert "calibration samples" not in done.stderr
