"""edgelm export: write a model (GGUF or edgelm directory) as a GGUF file that llama.cpp loads."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from edgelm.commands.common import add_model_argument, add_precision_argument

    add_model_argument(parser)
    add_precision_argument(parser)
    parser.add_argument("--format", default="gguf", choices=["gguf"], help="output format (default: gguf)")
    parser.add_argument("--type", default="Q8_0", help="ggml type of the weights: Q8_0, Q5_0, Q5_1, Q4_0, Q4_1, "
                        "F16, BF16 or F32 (default: Q8_0)")
    parser.add_argument("-o", "--output", required=True, help="output .gguf file")


def run(args: argparse.Namespace) -> int:
    from edgelm.commands.common import load_model
    from edgelm.io.gguf_export import export_gguf

    model, tokenizer = load_model(args)
    out = export_gguf(model, tokenizer, args.output, args.type)
    print(f"{out}: {out.stat().st_size / 1e6:.1f} MB ({args.type.upper()})")
    return 0
