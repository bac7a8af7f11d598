"""edgelm quantize: one quantization method applied to a model, written as an edgelm model directory."""

from __future__ import annotations

import argparse

from edgelm.commands.common import (add_calibration_arguments, add_model_argument, add_threads_argument,
                                    compress_and_save)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_argument(parser)
    parser.add_argument("--method", default="rtn",
                        help="rtn, gptq, awq, anyprec (nested 3- to 8-bit codes, one stored model) or mixed "
                             "(bits per tensor to a --target-bpw budget) (default: rtn)")
    parser.add_argument("--bits", type=int, default=4,
                        help="bits per weight: 2, 3, 4, 5, 6 or 8; for anyprec the precision the directory "
                             "loads at unless `--bits` is given then (default: 4)")
    parser.add_argument("--group-size", type=int, default=64,
                        help="weights sharing a scale; 0 = one group per output channel (default: 64)")
    parser.add_argument("--symmetric", action="store_true", help="symmetric grid (no zero points)")
    parser.add_argument("--fit", action="store_true",
                        help="least-squares fitted scales and fp16 zero points (+8 bits per group; "
                             "about half the error at 1-2 bits)")
    parser.add_argument("--target-bpw", type=float, default=None, metavar="BPW",
                        help="mixed: bits per weight of the whole model, embedding included (e.g. 4.5)")
    parser.add_argument("--min-bits", type=int, default=3, help="anyprec: lowest precision kept (default: 3)")
    parser.add_argument("--max-bits", type=int, default=8, help="anyprec: highest precision stored (default: 8)")
    parser.add_argument("--no-embedding", action="store_true",
                        help="leave the token embedding / tied output matrix unquantized")
    parser.add_argument("--ignore", action="append", default=[], metavar="GLOB",
                        help="module names to leave unquantized, e.g. 'layers.0.*' (repeatable)")
    add_calibration_arguments(parser)
    parser.add_argument("-o", "--output", required=True, help="output directory")
    add_threads_argument(parser)


def method_fields(args: argparse.Namespace) -> dict:
    """The recipe step's fields for --method, from the flags that method takes; a flag it does not take is an
    error rather than silently dropped."""
    from edgelm.errors import RecipeError

    given = {"--symmetric": args.symmetric, "--fit": args.fit, "--target-bpw": args.target_bpw is not None,
             "--min-bits": args.min_bits != 3, "--max-bits": args.max_bits != 8}
    if args.method == "mixed":
        if args.target_bpw is None:
            raise RecipeError("--method mixed needs --target-bpw, e.g. --target-bpw 4.5 (bits per weight of the "
                              "whole model, embedding included)")
        fields, takes = {"target_bpw": args.target_bpw, "ignore": args.ignore}, {"--target-bpw"}
        if args.no_embedding:
            raise RecipeError("--method mixed budgets the whole model, embedding included: drop --no-embedding")
    elif args.method == "anyprec":
        fields = {"bits": args.bits, "min_bits": args.min_bits, "max_bits": args.max_bits,
                  "group_size": args.group_size, "embedding": not args.no_embedding, "ignore": args.ignore}
        takes = {"--min-bits", "--max-bits"}
    else:
        fields = {"bits": args.bits, "group_size": args.group_size or None, "symmetric": args.symmetric,
                  "fit": args.fit, "embedding": not args.no_embedding, "ignore": args.ignore}
        takes = {"--symmetric", "--fit"}
    unused = [flag for flag, set_ in given.items() if set_ and flag not in takes]
    if unused:
        raise RecipeError(f"--method {args.method} does not take {', '.join(unused)}; drop it or pick a method "
                          "that does (mixed: --target-bpw; anyprec: --min-bits/--max-bits; rtn/gptq/awq: "
                          "--symmetric/--fit)")
    return {args.method: fields}


def run(args: argparse.Namespace) -> int:
    from edgelm.compress import parse_recipe

    return compress_and_save(args, parse_recipe([method_fields(args)]))
