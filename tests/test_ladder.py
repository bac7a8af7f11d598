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


# -- the docs' ladder table against the measured records ------------------------------------------------------
ROOT = __import__("pathlib").Path(__file__).resolve().parent.parent
DOCS_TABLE_HEADER = "| engine | rung ¹ | bits per weight | PPL@40 | PPL, all 576 |"


def bpw_text(bpw: float) -> str:
    return "32" if bpw == 32 else f"{bpw:.2f}"


def ppl_text(ppl: float) -> str:
    """How the docs table writes a PPL on the first 40 chunks."""
    return f"{ppl:.3f}" if ppl < 100 else f"{ppl:.1f}" if ppl < 1000 else f"{ppl:.0f}"


def ppl_all_text(ppl: float) -> str:
    return f"{ppl:.4f}" if ppl < 100 else f"{ppl:.2f}"


def docs_ladder_rows(text: str) -> list[dict]:
    """The rows of docs/compression.md's ladder table: engine, bpw, PPL@40 and PPL-all cells (bold removed),
    with their line numbers."""
    lines = text.split("\n")
    start = next(i for i, line in enumerate(lines) if line.startswith(DOCS_TABLE_HEADER))
    rows = []
    for i in range(start + 2, len(lines)):
        if not lines[i].startswith("|"):
            break
        cells = [c.strip().replace("**", "") for c in lines[i].split("|")[1:-1]]
        rows.append({"line": i, "engine": cells[0], "rung": cells[1], "bpw": cells[2], "ppl": cells[3],
                     "ppl_all": cells[4]})
    return rows


def names_the_rung(cell: str, record: dict) -> bool:
    """Whether a docs row's rung cell describes this record: an edgelm recipe names its steps' methods; a
    llama.cpp rung its type, "+ imatrix" exactly when it used one and its token-embedding type."""
    if record["engine"] == "edgelm":
        return all(method in cell for step in record["recipe"] for method in step)
    type_name, *extras = record["name"].split("+")
    embedding = next((e[len("emb-"):] for e in extras if e.startswith("emb-")), None)
    return (cell.split()[0].rstrip(",") == type_name and ("+ imatrix" in cell) == ("imat" in extras)
            and (embedding is None or f"embedding {embedding}" in cell))


def test_docs_ladder_table_matches_the_records():
    """Every measured rung is in docs/compression.md's table with the numbers of results.json (the table is
    written by hand, with each rung's recipe; this keeps it from going stale as rungs are re-measured)."""
    import json

    records = json.loads((ROOT / "benchmarks" / "results" / "ladder" / "results.json").read_text())
    rows = docs_ladder_rows((ROOT / "docs" / "compression.md").read_text())
    for record in records:
        where = f"{record['engine']} {record['name']}"
        matches = [row for row in rows if row["engine"] == record["engine"] and row["bpw"] == bpw_text(record["bpw"])
                   and row["ppl"] == ppl_text(record["ppl"]) and names_the_rung(row["rung"], record)]
        assert len(matches) == 1, f"{where}: no docs row with bpw {bpw_text(record['bpw'])}, PPL@40 {ppl_text(record['ppl'])}"
        cell = matches[0]["ppl_all"]
        if "(" in cell:  # a number from elsewhere, with its origin in parentheses
            continue
        assert cell == (ppl_all_text(record["ppl_all"]) if record.get("ppl_all") else ""), where
    assert len(rows) == len(records), "a docs row has no record in results.json"
