"""The quality ladder's report: a markdown table and a PNG plot of perplexity against bits per weight.

Records are dicts with engine, name, bpw, ppl (first N chunks), optionally ppl_all (every chunk), kld,
top1, compress_s and a note (how a rung was made when not by the current code, shown after its name);
`benchmarks/quality_ladder.py` produces them.
"""

from __future__ import annotations

import os
from pathlib import Path


def markdown_table(records: list[dict]) -> str:
    rows = sorted(records, key=lambda r: (r["engine"] != "edgelm", -r["bpw"]))
    lines = ["| engine | rung | bits per weight | PPL (first chunks) | PPL (all chunks) | KLD | same top % | time |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ppl_all = f"{r['ppl_all']:.3f}" if r.get("ppl_all") else ""
        kld = f"{r['kld']:.4f}" if r.get("kld") is not None else ""
        top1 = f"{100 * r['top1']:.1f}" if r.get("top1") is not None else ""
        seconds = f"{r['compress_s']:.0f} s" if r.get("compress_s") is not None else ""
        name = f"{r['name']} ({r['note']})" if r.get("note") else r["name"]
        lines.append(f"| {r['engine']} | {name} | {r['bpw']:.3f} | {r['ppl']:.3f} ± {r['stderr']:.3f} | "
                     f"{ppl_all} | {kld} | {top1} | {seconds} |")
    return "\n".join(lines) + "\n"


def pareto_front(records: list[dict]) -> list[dict]:
    """Rungs no other rung beats on both size and perplexity, by increasing bits per weight."""
    front, best = [], float("inf")
    for r in sorted(records, key=lambda r: (r["bpw"], r["ppl"])):
        if r["ppl"] < best:
            front.append(r)
            best = r["ppl"]
    return front


# The plot shows perplexities up to this multiple of the best one (and models up to MAX_PLOTTED_BPW): the
# unusable rungs would otherwise squeeze every usable one into a strip; they are listed under the plot.
PLOTTED_PPL_RATIO = 2.2
MAX_PLOTTED_BPW = 12.0


def plot(records: list[dict], path: Path, title: str) -> None:
    """PPL against bpw: the first chunks on the left, and where rungs have it, every chunk on the right."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = {r["chunks"] for r in records if r.get("chunks")}
    panels = [("ppl", f"first {counts.pop()} chunks" if len(counts) == 1 else "first chunks")]
    if any(r.get("ppl_all") for r in records):
        panels.append(("ppl_all", "all chunks"))
    fig, axes = plt.subplots(1, len(panels), figsize=(9 * len(panels), 6), dpi=120, squeeze=False)
    hidden_notes = []
    for ax, (key, label) in zip(axes[0], panels):
        scored = [{**r, "ppl": r[key]} for r in records if r.get(key)]
        hidden = _plot_panel(ax, scored, f"{title}, {label}")
        hidden_notes += [f"{r['engine']} {r['name']} ({r['bpw']:.2f} bpw, {label} PPL {r['ppl']:.1f})"
                         for r in sorted(hidden, key=lambda r: r["bpw"])]
    if hidden_notes:
        note = "\n".join(textwrap.wrap("Off the plot: " + "; ".join(hidden_notes), 150 * len(panels)))
        fig.text(0.01, 0.01, note, fontsize=6, va="bottom")
        fig.tight_layout(rect=(0, 0.02 + 0.018 * note.count("\n") + 0.018, 1, 1))
    else:
        fig.tight_layout()
    tmp = path.with_name(f".{path.name}.partial.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)


def _plot_panel(ax, records: list[dict], title: str) -> list[dict]:
    """One engine-coloured scatter with each engine's Pareto front; returns the records left off it."""
    import matplotlib.ticker

    best = min(r["ppl"] for r in records)
    shown = [r for r in records if r["ppl"] <= PLOTTED_PPL_RATIO * best and r["bpw"] <= MAX_PLOTTED_BPW] or records
    styles = {"edgelm": ("tab:blue", "o"), "llama.cpp": ("tab:orange", "s")}
    for engine, (color, marker) in styles.items():
        mine = [r for r in shown if r["engine"] == engine]
        if not mine:
            continue
        ax.scatter([r["bpw"] for r in mine], [r["ppl"] for r in mine], color=color, marker=marker, label=engine,
                   zorder=3, alpha=0.85)
        front = pareto_front(mine)
        ax.plot([r["bpw"] for r in front], [r["ppl"] for r in front], color=color, alpha=0.6, zorder=2)
        for r in front:  # the front's rungs are named; the table names the rest
            ax.annotate(r["name"], (r["bpw"], r["ppl"]), textcoords="offset points", xytext=(4, 4), fontsize=7,
                        color=color, rotation=30)
    ax.set_xlabel("bits per weight (whole model, embedding included)")
    ax.set_ylabel("perplexity (lower is better)")
    ax.set_yscale("log")
    ax.margins(x=0.04, y=0.12)  # room for the names
    ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%.0f"))
    ax.set_title(title + " (lines: each engine's Pareto front)", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper right")
    return [r for r in records if r not in shown]


def render_report(records: list[dict], out_dir: Path, title: str) -> None:
    table = out_dir / "ladder.md"
    tmp = table.with_name(".ladder.md.partial")
    tmp.write_text(f"# Quality ladder: {title}\n\n" + markdown_table(records))
    os.replace(tmp, table)
    if records:
        plot(records, out_dir / "ladder.png", title)
