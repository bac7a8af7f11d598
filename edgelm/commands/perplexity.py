"""edgelm perplexity: llama-perplexity's method, so the numbers compare with llama.cpp's."""

from __future__ import annotations

import argparse
import json

from edgelm.commands.common import (add_kv_bits_argument, add_model_argument, add_precision_argument,
                                    add_threads_argument, load_model, set_threads, warn_if_calibrated_on)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_argument(parser)
    add_precision_argument(parser)
    parser.add_argument("-f", "--file", required=True, help="text file to evaluate (read as raw bytes)")
    parser.add_argument("-c", "--ctx", type=int, default=512, help="context per chunk (default: 512)")
    parser.add_argument("--chunks", type=int, default=None, help="evaluate only the first N chunks")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    add_threads_argument(parser)
    add_kv_bits_argument(parser, default=32)  # exact unless asked


def run(args: argparse.Namespace) -> int:
    from edgelm.bench.quality import perplexity_of_file

    set_threads(args.threads)
    model, tokenizer = load_model(args)
    warn_if_calibrated_on(model, args.file)
    model.set_kv_bits(args.kv_bits)
    result = perplexity_of_file(model, tokenizer, args.file, ctx=args.ctx, chunks=args.chunks,
                                progress=not args.json)
    if args.json:
        print(json.dumps({k: v for k, v in result.to_dict().items() if k != "chunk_ppls"}))
    else:
        print(result.summary())
    return 0
