"""Speculative decoding against plain decoding of the same target, greedy, both in one run, alternating.

    python benchmarks/speculative.py --target DIR_OR_MODEL --draft DIR_OR_MODEL_OR_BITS [-n 128] [--reps 3]
    python benchmarks/speculative.py --target qwen2.5-coder-1.5b --draft qwen2.5-coder-0.5b-instruct --reps 5

Prints decode tokens/s of plain and speculative generation (median of the repetitions, min-max), the
speed-up, the acceptance (accepted ÷ drafted draft tokens), the mean accepted length per round, where a
round's time goes (the draft's proposals, the target's verification), and whether the speculative text is
identical to the plain greedy text (it must be).
"""

from __future__ import annotations

import argparse
import statistics
import sys

PROMPTS = [
    "def quicksort(arr):\n    \"\"\"Sort a list with quicksort.\"\"\"\n",
    "# Read a CSV file and print the average of the second column\nimport csv\n\n",
    "class Stack:\n    \"\"\"A LIFO stack backed by a Python list.\"\"\"\n\n    def __init__(self):\n",
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", required=True)
    parser.add_argument("--target-bits", type=int, default=None, help="precision of an any-precision target")
    parser.add_argument("--draft", required=True, help="a model, or a bit width N (the target at N bits)")
    parser.add_argument("--num-draft", type=int, nargs="+", default=[3])
    parser.add_argument("--draft-vocab", type=int, nargs="+", default=[None],
                        help="token ids the draft scores (0: all; default: the library's)")
    parser.add_argument("-n", "--max-tokens", type=int, default=128)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("-t", "--threads", type=int, default=None)
    args = parser.parse_args()

    import torch

    from edgelm import kernels
    from edgelm.commands.common import load_model
    from edgelm.runtime.generate import GenerationStats, generate_step
    from edgelm.runtime.sampling import Sampler, SamplingParams
    from edgelm.runtime.speculative import SpeculativeStats, speculative_generate_step

    if args.threads:
        torch.set_num_threads(args.threads)
        kernels.set_threads(args.threads)
    def load(name, bits=None):
        """As `edgelm generate` loads it: on the kernels alone where the directory allows."""
        return load_model(argparse.Namespace(model=name, bits=bits), for_inference=True, kernels_only=True)

    target, tokenizer = load(args.target, args.target_bits)
    draft, _ = load(args.target, int(args.draft)) if args.draft.isdigit() else load(args.draft)
    greedy = SamplingParams(temperature=0)

    def plain(prompt):
        stats = GenerationStats()
        tokens = list(generate_step(target, prompt, Sampler(greedy), args.max_tokens, stats))
        return tokens, stats

    def speculative(prompt, config, spec):
        k, vocab = config
        stats = GenerationStats()
        tokens = list(speculative_generate_step(target, draft, prompt, Sampler(greedy), args.max_tokens, k,
                                                stats, spec, vocab))
        return tokens, stats

    configs = [(k, v) for k in args.num_draft for v in args.draft_vocab]

    def label(config):
        k, vocab = config
        return f"k={k}" + ("" if len(args.draft_vocab) == 1 else f" v={vocab}")

    rows = []
    for text in PROMPTS:
        prompt = tokenizer.encode(text)
        plain(prompt[:8])  # warm-up: kernels repacked, caches allocated
        timings = {"plain": []}
        identical = True
        spec_stats = {c: SpeculativeStats() for c in configs}
        for _ in range(args.reps):
            reference, stats = plain(prompt)
            timings["plain"].append(stats.generation_tps)
            for c in configs:
                tokens, stats = speculative(prompt, c, spec_stats[c])
                timings.setdefault(c, []).append(stats.generation_tps)
                identical &= tokens == reference
        rows.append((text.splitlines()[0][:40], timings, spec_stats, identical))
        print(f"{text.splitlines()[0][:40]!r}: plain {statistics.median(timings['plain']):.1f} tok/s; " +
              "; ".join(f"{label(c)}: {statistics.median(timings[c]):.1f} tok/s, acceptance "
                        f"{spec_stats[c].acceptance:.0%}" for c in configs), file=sys.stderr)

    print(f"\ntarget {args.target}, draft {args.draft}, {args.max_tokens} tokens, greedy, median of {args.reps}\n")
    print("| prompt | plain tok/s | " + " | ".join(f"{label(c)} tok/s | speed-up | acceptance | mean accepted"
                                                      " | draft + verify ms/round" for c in configs) + " | identical |")
    print("|---|---|" + "---|---|---|---|---|" * len(configs) + "---|")
    for name, timings, spec_stats, identical in rows:
        base = statistics.median(timings["plain"])
        cells = [f"{name!r}", f"{base:.1f} ({min(timings['plain']):.1f}-{max(timings['plain']):.1f})"]
        for c in configs:
            med = statistics.median(timings[c])
            s = spec_stats[c]
            cells += [f"{med:.1f} ({min(timings[c]):.1f}-{max(timings[c]):.1f})", f"{med / base:.2f}x",
                      f"{s.acceptance:.0%}", f"{s.mean_accepted:.2f}",
                      f"{s.draft_ms_per_round:.0f} + {s.verify_ms_per_round:.0f}"]
        cells.append("yes" if identical else "NO")
        print("| " + " | ".join(cells) + " |")
    return 0 if all(r[3] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
