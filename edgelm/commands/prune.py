"""edgelm prune: magnitude, Wanda or SparseGPT pruning (unstructured or N:M), or structured pruning to a
smaller dense model, written as a model directory."""

from __future__ import annotations

import argparse

from edgelm.commands.common import (add_calibration_arguments, add_model_argument, add_threads_argument,
                                    compress_and_save)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_argument(parser)
    parser.add_argument("--method", default="wanda",
                        help="magnitude, wanda, sparsegpt or structured (default: wanda)")
    parser.add_argument("--sparsity", default="0.5",
                        help="fraction of weights to zero per row, e.g. 0.5, or N:M such as 2:4 (default: 0.5)")
    parser.add_argument("--ignore", action="append", default=[], metavar="GLOB",
                        help="module names to leave dense, e.g. 'layers.0.*' (repeatable)")
    structured = parser.add_argument_group("structured pruning (--method structured)")
    structured.add_argument("--ffn-keep", type=float, default=1.0, help="fraction of FFN channels kept per block")
    structured.add_argument("--heads-keep", type=float, default=1.0, help="fraction of query heads kept per block")
    structured.add_argument("--drop-layers", type=int, default=0, help="blocks removed, least influential first")
    add_calibration_arguments(parser)
    parser.add_argument("-o", "--output", required=True, help="output directory")
    add_threads_argument(parser)


def run(args: argparse.Namespace) -> int:
    from edgelm.compress import parse_recipe

    if args.method == "structured":
        return compress_and_save(args, parse_recipe([{"prune_structured": {
            "ffn_keep": args.ffn_keep, "heads_keep": args.heads_keep, "drop_layers": args.drop_layers}}]))
    sparsity: float | str = args.sparsity
    try:
        sparsity = float(args.sparsity)
    except ValueError:
        pass  # "N:M"; the step validates it
    return compress_and_save(args, parse_recipe([{args.method: {"sparsity": sparsity, "ignore": args.ignore}}]))
