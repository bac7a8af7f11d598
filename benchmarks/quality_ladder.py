"""The quality ladder: perplexity against bits per weight, edgelm's recipes next to llama.cpp's quant types.

    python benchmarks/quality_ladder.py                      # 40 chunks, every rung
    python benchmarks/quality_ladder.py --full               # also all 576 chunks
    python benchmarks/quality_ladder.py --only edgelm        # only our rungs (or: llama.cpp)

Both sides start from the same base: the registry's gemma-3-270m, dequantized. llama.cpp gets it as an F32
GGUF and quantizes it with `llama-quantize` (with and without an imatrix computed on the calibration text,
and with `--token-embedding-type` for rungs below what its standard types reach); edgelm compresses the
loaded model with a recipe. Calibration: WikiText-2 validation; evaluation: WikiText-2 raw test, ctx 512,
llama-perplexity's chunking on both sides. Bits per weight always count the whole model, embedding included
(llama.cpp: tensor bytes x 8 / parameters, as llama-quantize prints it).

Results are appended to OUT/results.json as each rung finishes (a rerun skips rungs already measured, so an
interrupted run resumes); OUT/ladder.md holds the table and OUT/ladder.png the plot.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data"

# edgelm's rungs: name -> recipe (the same YAML-like lists `edgelm compress --recipe` reads).
EDGELM_RUNGS: dict[str, list[dict]] = {
    "source": [{"source": {}}],  # the file's own grids, lossless
    "rtn-8": [{"rtn": {"bits": 8, "group_size": 128}}],  # the ~8 bpw rung: plain 8-bit, every tensor
    "mixed-6": [{"mixed": {"target_bpw": 6.0}}],
    "mixed-5.5": [{"mixed": {"target_bpw": 5.5}}],
    "mixed-5": [{"mixed": {"target_bpw": 5.0}}],
    "mixed-4.5": [{"mixed": {"target_bpw": 4.5}}],
    "mixed-4": [{"mixed": {"target_bpw": 4.0}}],
    "mixed-3.5": [{"mixed": {"target_bpw": 3.5}}],
    "mixed-3": [{"mixed": {"target_bpw": 3.0}}],
    "mixed-2.5": [{"mixed": {"target_bpw": 2.5}}],
    "mixed-2": [{"mixed": {"target_bpw": 2.0}}],
    "rtn-3+lorc-8": [{"rtn": {"bits": 3, "group_size": 64}}, {"lorc": {"rank": 8}}],
    "wanda-50%": [{"wanda": {"sparsity": 0.5}}],
    "sparsegpt-50%": [{"sparsegpt": {"sparsity": 0.5}}],
    "sparsegpt-2:4+gptq-4": [{"sparsegpt": {"sparsity": "2:4"}}, {"gptq": {"bits": 4, "group_size": 64}}],
    # ~200M parameters: 12 of 18 blocks, half the FFN channels and half the query heads.
    "structured-200M": [{"prune_structured": {"ffn_keep": 0.5, "heads_keep": 0.5, "drop_layers": 6}}],
    "structured-200M+kd": [{"prune_structured": {"ffn_keep": 0.5, "heads_keep": 0.5, "drop_layers": 6}},
                           {"distill_weights": {"steps": 100, "lr": 2e-5}}],
}

# llama.cpp's rungs: (type, imatrix?, token-embedding type or None).
LLAMA_CPP_RUNGS: list[tuple[str, bool, str | None]] = [
    ("Q8_0", False, None),
    ("Q6_K", True, None),
    ("Q5_K_M", True, None),
    ("Q4_K_M", False, None),
    ("Q4_K_M", True, None),
    ("Q4_0", False, None),
    ("IQ4_XS", True, None),
    ("Q3_K_M", True, None),
    ("Q2_K", True, None),
    ("IQ4_XS", True, "q5_0"),
    ("IQ4_XS", True, "iq4_nl"),
    ("Q3_K_M", True, "iq4_nl"),
    ("Q3_K_M", True, "q4_0"),
    ("Q2_K", True, "q4_0"),
    ("IQ2_XS", True, "q4_0"),
    # The same low rungs without an imatrix.
    ("IQ4_XS", False, "iq4_nl"),
    ("Q3_K_M", False, "q4_0"),
    ("Q2_K", False, "q4_0"),
]


def llama_rung_name(type_name: str, imatrix: bool, token_type: str | None) -> str:
    return type_name + ("+imat" if imatrix else "") + (f"+emb-{token_type}" if token_type else "")


def ordered_rungs(known, wanted: list[str] | None) -> list[str]:
    """The rungs to run: all in table order, or those asked for in the order asked (the first get done first)."""
    return list(known) if not wanted else [name for name in wanted if name in known]


class Results:
    """results.json: one record per rung, rewritten atomically after each."""

    def __init__(self, path: Path):
        self.path = path
        self.records: list[dict] = json.loads(path.read_text()) if path.is_file() else []

    def get(self, engine: str, name: str) -> dict | None:
        return next((r for r in self.records if r["engine"] == engine and r["name"] == name), None)

    def put(self, record: dict) -> None:
        # Re-read under a lock so that two runs (e.g. `--only edgelm` and `--only llama.cpp` side by side)
        # keep each other's records.
        import fcntl

        with open(self.path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            on_disk = json.loads(self.path.read_text()) if self.path.is_file() else []
            key = (record["engine"], record["name"])
            self.records = [r for r in on_disk if (r["engine"], r["name"]) != key] + [record]
            tmp = self.path.with_suffix(".json.partial")
            tmp.write_text(json.dumps(self.records, indent=1))
            os.replace(tmp, self.path)


def run_edgelm(args, results: Results, base, tokenizer) -> None:
    import copy

    import torch

    import edgelm
    from edgelm.bench.quality import perplexity_of_file
    from edgelm.compress.calibration import calibration_from_file
    from edgelm.compress.recipe import compress, parse_recipe
    from edgelm.io.artifact import model_size

    calibration = calibration_from_file(tokenizer, args.calib, n_samples=args.calib_samples, seq_len=512)
    for name in ordered_rungs(EDGELM_RUNGS, args.rungs):
        recipe = EDGELM_RUNGS[name]
        record = results.get("edgelm", name)
        if record and (record.get("ppl_all") or not args.full):
            continue
        saved = args.save_models / name if args.save_models else None
        if record and saved and saved.is_dir():  # measured on the first chunks already: score the saved model
            print(f"== edgelm {name}: all chunks of {saved}", file=sys.stderr)
            model, _ = edgelm.load(saved)
            results.put({**record, "ppl_all": perplexity_of_file(model, tokenizer, args.test).ppl})
            del model
            continue
        print(f"== edgelm {name}: {recipe}", file=sys.stderr)
        model = copy.deepcopy(base)
        start = time.perf_counter()
        torch.manual_seed(0)
        model = compress(model, parse_recipe(recipe), calibration)
        seconds = time.perf_counter() - start
        scored = perplexity_of_file(model, tokenizer, args.test, chunks=args.chunks, reference=base)
        record = {"engine": "edgelm", "name": name, "recipe": recipe, "bpw": model_size(model)["bits_per_weight"],
                  "ppl": scored.ppl, "stderr": scored.stderr, "kld": scored.kld, "top1": scored.top1_agreement,
                  "compress_s": round(seconds, 1), "chunks": scored.chunks}
        if args.full:
            record["ppl_all"] = perplexity_of_file(model, tokenizer, args.test).ppl
        results.put(record)
        print(json.dumps(record), file=sys.stderr)
        if saved:  # e.g. to benchmark a rung's speed: edgelm bench -m DIR/NAME --vs-llama-cpp
            from edgelm.io.artifact import save_artifact

            save_artifact(model, tokenizer, saved, recipe=recipe, source=base.source,
                          calibration=[calibration.record()])
        del model


def run_llama_cpp(args, results: Results, base, tokenizer) -> None:
    from edgelm.bench.llama_tools import ensure_tools
    from edgelm.io.gguf import GGUFFile
    from edgelm.io.gguf_export import export_gguf

    tools = ensure_tools(args.llama_cpp_bin)
    work = args.out / "gguf"
    work.mkdir(parents=True, exist_ok=True)
    base_gguf = work / "base-f32.gguf"
    if not base_gguf.is_file():
        export_gguf(base, tokenizer, base_gguf, "F32")
    imatrix = work / "imatrix.gguf"
    if not imatrix.is_file():
        tools.imatrix(base_gguf, args.calib, imatrix, chunks=100, threads=args.threads)
    by_name = {llama_rung_name(*rung): rung for rung in LLAMA_CPP_RUNGS}
    for name in ordered_rungs(by_name, args.rungs):
        type_name, use_imatrix, token_type = by_name[name]
        record = results.get("llama.cpp", name)
        if record and (record.get("ppl_all") or not args.full):
            continue
        print(f"== llama.cpp {name}", file=sys.stderr)
        out = work / f"{name}.gguf"
        tools.quantize(base_gguf, out, type_name, imatrix=imatrix if use_imatrix else None,
                       token_embedding_type=token_type, threads=args.threads)
        gguf = GGUFFile(out)
        n_params = sum(t.n_elements for t in gguf.tensors.values())
        bpw = 8 * sum(t.n_bytes for t in gguf.tensors.values()) / n_params
        ppl, stderr = tools.perplexity(out, args.test, chunks=args.chunks, threads=args.threads)
        record = {"engine": "llama.cpp", "name": name, "bpw": bpw, "ppl": ppl, "stderr": stderr,
                  "imatrix": use_imatrix, "file_mb": out.stat().st_size / 1e6}
        if args.full:
            record["ppl_all"] = tools.perplexity(out, args.test, threads=args.threads)[0]
        results.put(record)
        print(json.dumps(record), file=sys.stderr)
        out.unlink()  # the quantized files are cheap to remake and large to keep


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-m", "--model", default="gemma-3-270m")
    parser.add_argument("--calib", type=Path, default=DATA / "wikitext-2" / "valid.txt")
    parser.add_argument("--calib-samples", type=int, default=64,
                        help="calibration windows of 512 tokens (default: 64, as edgelm's commands)")
    parser.add_argument("--test", type=Path, default=DATA / "wikitext-2-raw" / "wiki.test.raw")
    parser.add_argument("--chunks", type=int, default=40, help="chunks for the main PPL column (default: 40)")
    parser.add_argument("--full", action="store_true", help="also score all chunks of the test file")
    parser.add_argument("--only", choices=("edgelm", "llama.cpp"), default=None)
    parser.add_argument("--rungs", nargs="*", default=None, help="only these rung names, run in this order")
    parser.add_argument("--llama-cpp-bin", default=None, help="directory with llama-quantize/-imatrix/-perplexity")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--save-models", type=Path, default=None, metavar="DIR",
                        help="also write each compressed rung as an edgelm model directory DIR/NAME; with "
                             "--full, a rung already scored on the first chunks is scored on all from DIR/NAME")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "ladder")
    parser.add_argument("--report-only", action="store_true", help="redraw the table and plot from results.json")
    args = parser.parse_args()
    known = set(EDGELM_RUNGS) | {llama_rung_name(*rung) for rung in LLAMA_CPP_RUNGS}
    unknown = [name for name in args.rungs or () if name not in known]
    if unknown:
        parser.error(f"unknown rung {', '.join(unknown)}; the rungs are: {', '.join(sorted(known))}")

    from edgelm.bench.ladder import render_report
    from edgelm.errors import EdgelmError

    args.out.mkdir(parents=True, exist_ok=True)
    results = Results(args.out / "results.json")
    try:
        if not args.report_only:
            import torch

            import edgelm

            torch.set_num_threads(args.threads)
            base, tokenizer = edgelm.load(args.model)
            if args.only in (None, "llama.cpp"):
                run_llama_cpp(args, results, base, tokenizer)
            if args.only in (None, "edgelm"):
                run_edgelm(args, results, base, tokenizer)
        render_report(results.records, args.out, title=f"{args.model}, wiki.test.raw, ctx 512")
    except EdgelmError as error:
        print(f"quality_ladder: error: {error}", file=sys.stderr)
        return 1
    print(f"wrote {args.out / 'ladder.md'} and {args.out / 'ladder.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
