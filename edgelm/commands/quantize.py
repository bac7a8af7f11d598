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
    parser.add_argument("--bits", type=int, default=None,
                        help="bits per weight: 2, 3, 4, 5, 6 or 8; for anyprec the precision the directory "
                             "loads at unless given another --bits then (default: 4)")
    parser.add_argument("--group-size", type=int, default=None,
                        help="weights sharing a scale; 0 = one group per output channel (default: 64)")
    parser.add_argument("--symmetric", action="store_true", help="symmetric grid (no zero points)")
    parser.add_argument("--fit", action="store_true",
                        help="least-squares fitted scales and fp16 zero points (+8 bits per group; "
                             "about half the error at 1-2 bits)")
    parser.add_argument("--target-bpw", type=float, default=None, metavar="BPW",
                        help="mixed: bits per weight of the whole model, embedding included (e.g. 4.5)")
    parser.add_argument("--min-bits", type=int, default=None,
                        help="anyprec: lowest precision the directory offers at load (default: 3)")
    parser.add_argument("--max-bits", type=int, default=None, help="anyprec: highest precision stored (default: 8)")
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

    given = {"--bits": args.bits is not None, "--group-size": args.group_size is not None,
             "--symmetric": args.symmetric, "--fit": args.fit, "--target-bpw": args.target_bpw is not None,
             "--min-bits": args.min_bits is not None, "--max-bits": args.max_bits is not None,
             "--no-embedding": args.no_embedding}
    bits = 4 if args.bits is None else args.bits
    group_size = 64 if args.group_size is None else args.group_size
    if args.method == "mixed":
        if args.target_bpw is None:
            raise RecipeError("--method mixed needs --target-bpw, e.g. --target-bpw 4.5 (bits per weight of the "
                              "whole model, embedding included)")
        # The budget covers the whole model, embedding included; bits and groups are chosen per tensor.
        fields, takes = {"target_bpw": args.target_bpw, "ignore": args.ignore}, {"--target-bpw"}
    elif args.method == "anyprec":
        fields = {"bits": bits, "min_bits": 3 if args.min_bits is None else args.min_bits,
                  "max_bits": 8 if args.max_bits is None else args.max_bits, "group_size": group_size,
                  "embedding": not args.no_embedding, "ignore": args.ignore}
        takes = {"--bits", "--group-size", "--min-bits", "--max-bits", "--no-embedding"}
    else:
        fields = {"bits": bits, "group_size": group_size or None, "symmetric": args.symmetric, "fit": args.fit,
                  "embedding": not args.no_embedding, "ignore": args.ignore}
        takes = {"--bits", "--group-size", "--symmetric", "--fit", "--no-embedding"}
    unused = [flag for flag, set_ in given.items() if set_ and flag not in takes]
    if unused:
        raise RecipeError(f"--method {args.method} does not take {', '.join(unused)}; drop it or pick a method "
                          "that does (mixed: --target-bpw; anyprec: --bits/--min-bits/--max-bits; rtn/gptq/awq: "
                          "--bits/--group-size/--symmetric/--fit)")
    return {args.method: fields}


def run(args: argparse.Namespace) -> int:
    from edgelm.compress import parse_recipe

    return compress_and_save(args, parse_recipe([method_fields(args)]))
