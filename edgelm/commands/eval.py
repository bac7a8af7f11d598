"""edgelm eval: a compressed model's quality against the model it came from, and its size."""

from __future__ import annotations

import argparse
import json

from edgelm.commands.common import (add_model_argument, add_precision_argument, add_threads_argument, load_model,
                                    set_threads, warn_if_calibrated_on)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_argument(parser)
    add_precision_argument(parser)
    parser.add_argument("--reference", default=None,
                        help="uncompressed model to compare with (default: the source recorded in the directory)")
    parser.add_argument("-f", "--file", required=True, help="evaluation text (read as raw bytes)")
    parser.add_argument("-c", "--ctx", type=int, default=512, help="context per chunk (default: 512)")
    parser.add_argument("--chunks", type=int, default=None, help="evaluate only the first N chunks")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    add_threads_argument(parser)


def run(args: argparse.Namespace) -> int:
    import edgelm
    from edgelm.bench.quality import perplexity_of_file
    from edgelm.errors import EdgelmError
    from edgelm.io.artifact import model_size

    set_threads(args.threads)
    model, tokenizer = load_model(args)
    warn_if_calibrated_on(model, args.file)
    reference_name = args.reference or getattr(model, "source", None)
    if reference_name is None:
        raise EdgelmError(f"{args.model} records no source model; pass --reference MODEL")
    reference, _ = edgelm.load(reference_name)
    result = perplexity_of_file(model, tokenizer, args.file, ctx=args.ctx, chunks=args.chunks,
                                progress=not args.json, reference=reference)
    size = model_size(model)
    if args.json:
        out = {k: v for k, v in result.to_dict().items() if k != "chunk_ppls"}
        print(json.dumps({**out, **size, "reference": str(reference_name)}))
    else:
        print(result.summary())
        print(f"size: {size['parameters'] / 1e6:.1f}M weights in {size['bytes'] / 1e6:.1f} MB, "
              f"{size['bits_per_weight']:.3f} bits per weight (whole model, embedding included)")
    return 0
