"""edgelm bench: prompt/decode speed, TTFT, load time and peak memory, optionally against llama.cpp."""

from __future__ import annotations

import argparse
import json

from edgelm.commands.common import (add_kv_bits_argument, add_model_argument, add_precision_argument,
                                    add_threads_argument)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_argument(parser)
    add_precision_argument(parser)
    parser.add_argument("-p", "--prompt-tokens", type=int, default=512,
                        help="prompt length for prompt processing speed (default: 512)")
    parser.add_argument("-n", "--gen-tokens", type=int, default=128,
                        help="greedy decode steps after the prompt (default: 128)")
    add_threads_argument(parser)
    add_kv_bits_argument(parser)
    parser.add_argument("--reps", type=int, default=3,
                        help="repetitions, each in a fresh process per engine (default: 3)")
    parser.add_argument("--vs-llama-cpp", action="store_true",
                        help="also run llama.cpp (pip install 'edgelm[llama]') on the same file, alternating")
    parser.add_argument("--llama-cpp-model", default=None, metavar="GGUF",
                        help="the GGUF llama.cpp runs with --vs-llama-cpp (default: the same file, or for a "
                             "model directory the GGUF it was made from)")
    output = parser.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="print every repetition and the summaries as JSON")
    output.add_argument("--brief", action="store_true", help="print a single summary line")


def run(args: argparse.Namespace) -> int:
    from edgelm.bench.speed import run_benchmark

    report = run_benchmark(args.model, prompt_tokens=args.prompt_tokens, gen_tokens=args.gen_tokens,
                           threads=args.threads, reps=args.reps, vs_llama_cpp=args.vs_llama_cpp,
                           llama_cpp_model=args.llama_cpp_model, kv_bits=args.kv_bits, bits=args.bits)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    elif args.brief:
        print(report.brief())
    else:
        print(report.table())
    return 0
