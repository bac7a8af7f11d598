"""edgelm prune: magnitude, Wanda or SparseGPT pruning (unstructured or N:M), written as a model directory."""

from __future__ import annotations

import argparse

from edgelm.commands.common import (add_calibration_arguments, add_model_argument, add_threads_argument,
                                    compress_and_save)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_argument(parser)
    parser.add_argument("--method", default="wanda", help="magnitude, wanda or sparsegpt (default: wanda)")
    parser.add_argument("--sparsity", default="0.5",
                        help="fraction of weights to zero per row, e.g. 0.5, or N:M such as 2:4 (default: 0.5)")
    parser.add_argument("--ignore", action="append", default=[], metavar="GLOB",
                        help="module names to leave dense, e.g. 'layers.0.*' (repeatable)")
    add_calibration_arguments(parser)
    parser.add_argument("-o", "--output", required=True, help="output directory")
    add_threads_argument(parser)


def run(args: argparse.Namespace) -> int:
    from edgelm.compress import parse_recipe

    sparsity: float | str = args.sparsity
    try:
        sparsity = float(args.sparsity)
    except ValueError:
        pass  # "N:M"; the step validates it
    return compress_and_save(args, parse_recipe([{args.method: {"sparsity": sparsity, "ignore": args.ignore}}]))
