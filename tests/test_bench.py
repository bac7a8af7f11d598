"""Speed benchmark: statistics, ratios and output formats; worker isolation; errors; real runs vs llama.cpp."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from edgelm.bench.speed import (EDGELM, LLAMA_CPP, METRICS, BenchReport, Run, Stats, benchmark_prompt,
                                bytes_read_per_token, peak_rss_bytes, run_benchmark)
from edgelm.cli import main
from edgelm.errors import BenchmarkError

MIB = 2**20


def run_of(engine: str, prompt_s: float, decode_s: float, rss_mib: int = 500) -> Run:
    return Run(engine=engine, prompt_tokens=64, gen_tokens=8, load_s=1.0, ttft_s=prompt_s * 2,
               prompt_s=prompt_s, decode_s=decode_s, peak_rss_bytes=rss_mib * MIB, model_bytes=200 * MIB,
               bytes_per_token=100_000_000)


def report_of(runs: dict[str, list[Run]]) -> BenchReport:
    reps = len(next(iter(runs.values())))
    return BenchReport("tiny", "/models/tiny.gguf", 64, 8, threads=2, reps=reps, runs=runs)


def assert_positive_numbers(run: dict) -> None:
    for m in METRICS:
        assert run[m.key] > 0, (run["engine"], m.key)


def test_stats_are_min_median_max():
    assert Stats.of([3.0, 1.0, 2.0]) == Stats(1.0, 2.0, 3.0)
    assert Stats.of([4.0, 1.0]) == Stats(1.0, 2.5, 4.0)


def test_metrics_derive_from_raw_timings():
    values = run_of(EDGELM, prompt_s=0.5, decode_s=2.0).metrics()
    assert values["prompt_tps"] == 128.0
    assert values["decode_tps"] == 4.0
    assert values["ttft_ms"] == 1000.0
    assert values["peak_rss_mib"] == 500.0
    assert values["effective_gbps"] == pytest.approx(0.4)  # 100 MB per token x 4 tok/s


def test_ratios_are_ours_over_theirs_of_the_medians():
    report = report_of({
        EDGELM: [run_of(EDGELM, 1.0, 4.0), run_of(EDGELM, 2.0, 8.0), run_of(EDGELM, 4.0, 2.0)],
        LLAMA_CPP: [run_of(LLAMA_CPP, 0.5, 1.0, 100), run_of(LLAMA_CPP, 0.25, 2.0, 100),
                    run_of(LLAMA_CPP, 1.0, 0.5, 100)],
    })
    ratios = report.ratios()
    assert ratios["prompt_tps"] == pytest.approx(32.0 / 128.0)  # medians: 32 tok/s vs 128 tok/s
    assert ratios["decode_tps"] == pytest.approx(2.0 / 8.0)
    assert ratios["peak_rss_mib"] == pytest.approx(5.0)
    ours, theirs = report.summary(EDGELM), report.summary(LLAMA_CPP)
    for m in METRICS:
        assert ratios[m.key] == pytest.approx(ours[m.key].median / theirs[m.key].median)


def test_table_json_and_brief_formats():
    report = report_of({EDGELM: [run_of(EDGELM, 1.0, 4.0)], LLAMA_CPP: [run_of(LLAMA_CPP, 0.5, 1.0)]})
    table = report.table()
    lines = table.splitlines()
    assert "edgelm/llama.cpp" in lines[2] and "median (min-max) of 1 reps" in lines[0]
    assert len(lines) == 3 + len(METRICS)
    decode_row = next(line for line in lines if line.startswith("decode tok/s"))
    assert "2.00 (2.00-2.00)" in decode_row and "8.00 (8.00-8.00)" in decode_row
    assert "0.250" in decode_row and "> 1 favours edgelm" in decode_row
    assert "< 1 favours edgelm" in next(line for line in lines if line.startswith("TTFT"))

    data = json.loads(json.dumps(report.to_dict()))
    assert set(data["engines"]) == {EDGELM, LLAMA_CPP}
    assert data["engines"][EDGELM]["runs"][0]["decode_tps"] == 2.0
    assert data["engines"][LLAMA_CPP]["summary"]["decode_tps"] == {"min": 8.0, "median": 8.0, "max": 8.0}
    assert data["ratios"]["decode_tps"] == 0.25 and data["higher_is_better"]["load_s"] is False

    assert report.brief() == ("tiny: prompt 64 tok @ 64.0 tok/s | decode 8 tok @ 2.0 tok/s | TTFT 2000 ms | "
                              "import+load 1.00 s | peak RSS 500 MiB | vs llama.cpp: prompt 0.50x, decode 0.25x")


def test_edgelm_alone_has_no_ratios():
    report = report_of({EDGELM: [run_of(EDGELM, 1.0, 4.0)]})
    assert report.ratios() == {}
    assert "llama.cpp" not in report.table() and "llama.cpp" not in report.brief()


def test_prompt_is_deterministic_ordinary_tokens_with_bos():
    token_types = [3, 3, 3] + [1] * 50 + [6] * 10  # control, normal, byte tokens
    metadata = {"tokenizer.ggml.tokens": [f"t{i}" for i in range(len(token_types))],
                "tokenizer.ggml.token_type": token_types,
                "tokenizer.ggml.bos_token_id": 2, "tokenizer.ggml.add_bos_token": True}
    tokens = benchmark_prompt(metadata, 200)
    assert tokens == benchmark_prompt(metadata, 200)
    assert len(tokens) == 200 and tokens[0] == 2
    assert all(3 <= t < 53 for t in tokens[1:])
    assert benchmark_prompt({**metadata, "tokenizer.ggml.add_bos_token": False}, 200)[0] != 2


def test_bytes_read_per_token():
    # Tied: the embedding table is the output matrix, read whole. Untied: one embedding row is looked up.
    assert bytes_read_per_token(1000, 400, vocab_size=100, tied=True) == 1000
    assert bytes_read_per_token(1000, 400, vocab_size=100, tied=False) == 604


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the ru_maxrss inheritance is Linux behaviour")
def test_worker_peak_rss_is_its_own_not_its_parents():
    ballast = np.ones(400 * MIB // 8)  # this process now peaks above 400 MiB
    code = "from edgelm.bench.speed import peak_rss_bytes; print(peak_rss_bytes())"
    child_peak = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                    check=True).stdout)
    assert child_peak < 200 * MIB < 400 * MIB < peak_rss_bytes()
    del ballast


def test_missing_llama_cpp_says_to_install_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # makes `import llama_cpp` raise ImportError
    with pytest.raises(BenchmarkError, match=r"pip install 'edgelm\[llama\]'"):
        run_benchmark("gemma-3-270m", vs_llama_cpp=True)


def test_missing_llama_cpp_through_the_cli():
    code = ("import sys; sys.modules['llama_cpp'] = None; from edgelm.cli import main; "
            "sys.exit(main(['bench', '-m', 'gemma-3-270m', '--vs-llama-cpp']))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "edgelm: error: --vs-llama-cpp needs llama-cpp-python, which is not installed: "
        "pip install 'edgelm[llama]'"]


@pytest.mark.parametrize("argv, message", [
    (["-p", "0"], "-p/--prompt-tokens must be >= 1, got 0"),
    (["-n", "0"], "-n/--gen-tokens must be >= 1, got 0"),
    (["--reps", "0"], "--reps must be >= 1, got 0"),
    (["--threads", "0"], "--threads must be >= 1, got 0"),
])
def test_bad_counts_give_a_one_line_error(capsys, argv, message):
    assert main(["bench", "-m", "gemma-3-270m", *argv]) == 1
    assert capsys.readouterr().err.splitlines() == [f"edgelm: error: {message}"]


def test_non_numbers_are_argparse_errors(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "-p", "many"])
    assert exc.value.code == 2 and "invalid int value: 'many'" in capsys.readouterr().err


@pytest.mark.llama_cpp
def test_tiny_model_against_llama_cpp(tmp_path):
    pytest.importorskip("llama_cpp")
    tiny_gguf = pytest.importorskip("tests.tiny_gguf")
    path = tiny_gguf.write_tiny_model(tmp_path / "tiny.gguf", tiny_gguf.TinyConfig(arch="llama", tied=False))
    report = run_benchmark(str(path), prompt_tokens=16, gen_tokens=4, threads=1, reps=2, vs_llama_cpp=True,
                           progress=False)
    data = report.to_dict()
    assert data["model"] == "tiny" and [len(data["engines"][e]["runs"]) for e in (EDGELM, LLAMA_CPP)] == [2, 2]
    assert data["engines"][EDGELM]["runs"][0]["runtime"] == "pytorch"  # a GGUF file: the PyTorch models
    for engine in (EDGELM, LLAMA_CPP):
        for run in data["engines"][engine]["runs"]:
            assert_positive_numbers(run)
    # The tiny model's weights are float32 in the file, so both engines hold the same bytes.
    from edgelm.io.gguf import GGUFFile

    assert data["engines"][LLAMA_CPP]["runs"][0]["model_bytes"] == GGUFFile(path).tensor_bytes
    assert data["ratios"]["model_mib"] == pytest.approx(1.0, rel=0.01)


@pytest.mark.slow
@pytest.mark.llama_cpp
def test_cli_json_against_llama_cpp_on_gemma():
    pytest.importorskip("llama_cpp")
    proc = subprocess.run(
        [sys.executable, "-m", "edgelm", "bench", "-m", "gemma-3-270m", "-p", "64", "-n", "8", "--reps", "1",
         "--vs-llama-cpp", "--json"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "rep 1/1 llama.cpp" in proc.stderr  # progress goes to stderr, stdout stays JSON
    data = json.loads(proc.stdout)
    assert (data["prompt_tokens"], data["gen_tokens"], data["reps"]) == (64, 8, 1)
    summaries = {}
    for engine in (EDGELM, LLAMA_CPP):
        (run,) = data["engines"][engine]["runs"]
        assert_positive_numbers(run)
        summaries[engine] = data["engines"][engine]["summary"]
    for m in METRICS:
        ours, theirs = summaries[EDGELM][m.key]["median"], summaries[LLAMA_CPP][m.key]["median"]
        assert data["ratios"][m.key] == pytest.approx(ours / theirs)
    # Both compute with the file's quantized grids (edgelm stores K-quant sub-scales as fp16: a little more).
    assert 1.0 <= data["ratios"]["model_mib"] < 1.1


@pytest.mark.llama_cpp
def test_model_directory_against_its_source_gguf(tmp_path):
    """A compressed model directory is benchmarked as itself; llama.cpp runs the GGUF it was made from."""
    pytest.importorskip("llama_cpp")
    tiny_gguf = pytest.importorskip("tests.tiny_gguf")
    path = tiny_gguf.write_tiny_model(tmp_path / "tiny.gguf", tiny_gguf.TinyConfig(arch="qwen2", dim=128,
                                                                                   hidden_dim=256))
    out = tmp_path / "q4"
    assert main(["quantize", "-m", str(path), "--bits", "4", "-o", str(out)]) == 0
    report = run_benchmark(str(out), prompt_tokens=16, gen_tokens=4, threads=1, reps=1, vs_llama_cpp=True,
                           progress=False)
    data = report.to_dict()
    ours, theirs = (data["engines"][e]["runs"][0] for e in (EDGELM, LLAMA_CPP))
    assert_positive_numbers(ours)
    # A directory in the plane layout runs on the kernels-only runtime, without PyTorch.
    assert (ours["runtime"], theirs["runtime"]) == ("kernels", LLAMA_CPP)
    assert "edgelm on its kernels runtime" in report.table().splitlines()[0]
    assert ours["model_bytes"] < 0.5 * theirs["model_bytes"]  # 4-bit codes against the float32 file
    path.unlink()  # the source moved away: say how to name the GGUF to compare with
    with pytest.raises(BenchmarkError, match="--llama-cpp-model"):
        run_benchmark(str(out), prompt_tokens=16, gen_tokens=4, reps=1, vs_llama_cpp=True, progress=False)


def test_any_precision_directory_at_chosen_bits(tmp_path):
    """--bits benchmarks an any-precision directory at that precision (on the PyTorch models, which hold the
    bit planes); on a GGUF or out of the stored range it is a one-line error."""
    tiny_gguf = pytest.importorskip("tests.tiny_gguf")
    path = tiny_gguf.write_tiny_model(tmp_path / "tiny.gguf", tiny_gguf.TinyConfig(arch="qwen2"))
    out = tmp_path / "ap"
    assert main(["quantize", "-m", str(path), "--method", "anyprec", "--group-size", "32", "-o", str(out)]) == 0
    report = run_benchmark(str(out), prompt_tokens=8, gen_tokens=2, threads=1, reps=1, bits=3, progress=False)
    data = report.to_dict()
    assert data["model"].endswith("at 3 bits")
    run = data["engines"][EDGELM]["runs"][0]
    assert run["runtime"] == "pytorch"
    assert_positive_numbers(run)
    at_8 = run_benchmark(str(out), prompt_tokens=8, gen_tokens=2, threads=1, reps=1, bits=8, progress=False)
    # A token reads the n-bit copy the layers compute with, not the store of every precision.
    assert run["bytes_per_token"] < 0.6 * at_8.to_dict()["engines"][EDGELM]["runs"][0]["bytes_per_token"]
    with pytest.raises(BenchmarkError, match="any-precision model directory"):
        run_benchmark(str(path), prompt_tokens=8, gen_tokens=2, reps=1, bits=3, progress=False)
    with pytest.raises(BenchmarkError, match="choose --bits in that range"):
        run_benchmark(str(out), prompt_tokens=8, gen_tokens=2, reps=1, bits=9, progress=False)
