"""The quality ladder's pieces: llama-perplexity output parsing, the Pareto front, the table and the plot."""

from __future__ import annotations

import pytest

from edgelm.bench.ladder import markdown_table, pareto_front, render_report
from edgelm.bench.llama_tools import find_tools, parse_final_estimate
from edgelm.errors import BenchmarkError

RECORDS = [
    {"engine": "edgelm", "name": "a", "bpw": 4.5, "ppl": 18.0, "stderr": 0.5, "kld": 0.05, "top1": 0.9,
     "compress_s": 60.0},
    {"engine": "edgelm", "name": "b", "bpw": 3.0, "ppl": 20.0, "stderr": 0.6, "ppl_all": 21.0},
    {"engine": "edgelm", "name": "c", "bpw": 5.0, "ppl": 19.0, "stderr": 0.5, "note": "older"},  # dominated by a
    {"engine": "llama.cpp", "name": "Q4_0", "bpw": 7.01, "ppl": 24.9, "stderr": 0.8},
]


def test_parse_final_estimate():
    output = "...\n[1]15.1,[2]16.3,\nFinal estimate: PPL = 17.1719 +/- 0.52345\nllama_perf_context_print: ..."
    assert parse_final_estimate(output) == (17.1719, 0.52345)
    with pytest.raises(BenchmarkError, match="no 'Final estimate'"):
        parse_final_estimate("error: failed to load model")


def test_missing_tools_are_named(tmp_path):
    (tmp_path / "llama-quantize").write_text("")
    with pytest.raises(BenchmarkError, match="lacks llama-imatrix, llama-perplexity"):
        find_tools(tmp_path)


def test_pareto_front_drops_dominated_rungs():
    front = pareto_front([r for r in RECORDS if r["engine"] == "edgelm"])
    assert [r["name"] for r in front] == ["b", "a"]


def test_table_and_plot(tmp_path):
    table = markdown_table(RECORDS)
    assert table.splitlines()[2].startswith("| edgelm | c (older) | 5.000 | 19.000 ± 0.500 |")
    assert "| 21.000 |" in table and "| 0.0500 | 90.0 | 60 s |" in table
    pytest.importorskip("matplotlib")
    render_report(RECORDS, tmp_path, "test")
    assert (tmp_path / "ladder.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| llama.cpp | Q4_0 | 7.010 |" in (tmp_path / "ladder.md").read_text()
    assert not list(tmp_path.glob(".*partial*"))


def _ladder_script():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "quality_ladder.py"
    spec = importlib.util.spec_from_file_location("quality_ladder", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_two_ladder_runs_keep_each_others_results(tmp_path):
    """`--only edgelm` and `--only llama.cpp` side by side write one results.json without losing records."""
    ladder = _ladder_script()
    first, second = ladder.Results(tmp_path / "results.json"), ladder.Results(tmp_path / "results.json")
    first.put({"engine": "edgelm", "name": "a", "ppl": 1.0})
    second.put({"engine": "llama.cpp", "name": "Q8_0", "ppl": 2.0})
    first.put({"engine": "edgelm", "name": "a", "ppl": 3.0})  # a rung measured again replaces its record
    on_disk = ladder.Results(tmp_path / "results.json").records
    assert sorted((r["name"], r["ppl"]) for r in on_disk) == [("Q8_0", 2.0), ("a", 3.0)]


def test_rungs_run_in_the_order_asked():
    ladder = _ladder_script()
    assert ladder.ordered_rungs(ladder.EDGELM_RUNGS, ["mixed-3", "source", "Q8_0"]) == ["mixed-3", "source"]
    assert ladder.ordered_rungs(ladder.EDGELM_RUNGS, None) == list(ladder.EDGELM_RUNGS)
