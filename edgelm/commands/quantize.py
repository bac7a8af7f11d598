"""edgelm quantize: one quantization method applied to a model, written as an edgelm model directory."""

from __future__ import annotations

import argparse

from edgelm.commands.common import (add_calibration_arguments, add_model_argument, add_threads_argument,
                                    compress_and_save)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_argument(parser)
    parser.add_argument("--method", default="rtn", help="rtn, gptq or awq (default: rtn)")
    parser.add_argument("--bits", type=int, default=4, help="bits per weight: 2, 3, 4, 5, 6 or 8 (default: 4)")
    parser.add_argument("--group-size", type=int, default=64,
                        help="weights sharing a scale; 0 = one group per output channel (default: 64)")
    parser.add_argument("--symmetric", action="store_true", help="symmetric grid (no zero points)")
    parser.add_argument("--fit", action="store_true",
                        help="least-squares fitted scales and fp16 zero points (+8 bits per group; "
                             "about half the error at 1-2 bits)")
    parser.add_argument("--no-embedding", action="store_true",
                        help="leave the token embedding / tied output matrix unquantized")
    parser.add_argument("--ignore", action="append", default=[], metavar="GLOB",
                        help="module names to leave unquantized, e.g. 'layers.0.*' (repeatable)")
    add_calibration_arguments(parser)
    parser.add_argument("-o", "--output", required=True, help="output directory")
    add_threads_argument(parser)


def run(args: argparse.Namespace) -> int:
    from edgelm.compress import parse_recipe

    steps = parse_recipe([{args.method: {"bits": args.bits, "group_size": args.group_size or None,
                                         "symmetric": args.symmetric, "fit": args.fit, "embedding": not args.no_embedding,
                                         "ignore": args.ignore}}])
    return compress_and_save(args, steps)
