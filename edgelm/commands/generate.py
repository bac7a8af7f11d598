"""edgelm generate: stream a completion to the terminal."""

from __future__ import annotations

import argparse
import sys

from edgelm.commands.common import (add_kv_bits_argument, add_model_argument, add_precision_argument,
                                    add_sampling_arguments, add_threads_argument, load_model, sampling_params,
                                    set_threads)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_argument(parser)
    add_precision_argument(parser)
    parser.add_argument("-p", "--prompt", required=True, help="prompt text ('-' reads standard input)")
    add_sampling_arguments(parser)
    add_threads_argument(parser)
    add_kv_bits_argument(parser)
    parser.add_argument("--no-bos", action="store_true", help="do not add the BOS token to the prompt")
    parser.add_argument("--verbose", "-v", action="store_true", help="print speed statistics to stderr")


def run(args: argparse.Namespace) -> int:
    import edgelm

    params = sampling_params(args)
    set_threads(args.threads)
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    model, tokenizer = load_model(args)
    model.set_kv_bits(args.kv_bits)
    last = None
    for response in edgelm.stream_generate(model, tokenizer, prompt, max_tokens=args.max_tokens,
                                           sampling=params, stop=args.stop,
                                           add_bos=False if args.no_bos else None):
        sys.stdout.write(response.text)
        sys.stdout.flush()
        last = response
    sys.stdout.write("\n")
    if args.verbose and last is not None:
        s = last.stats
        print(f"prompt: {s.prompt_tokens} tokens, {s.prompt_tps:.1f} tok/s | generation: "
              f"{s.generation_tokens} tokens, {s.generation_tps:.1f} tok/s | first token "
              f"{s.first_token_seconds * 1000:.0f} ms | finish: {last.finish_reason}", file=sys.stderr)
    return 0
