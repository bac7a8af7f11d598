"""Arguments and helpers shared by the commands."""

from __future__ import annotations

import argparse


def add_model_argument(parser: argparse.ArgumentParser) -> None:
    from edgelm.registry import DEFAULT_MODEL

    parser.add_argument("-m", "--model", default=DEFAULT_MODEL,
                        help=f"registry name or path to a .gguf file (default: {DEFAULT_MODEL})")


def add_threads_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-t", "--threads", type=int, default=None,
                        help="CPU threads for compute (default: all cores)")


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    from edgelm.runtime.sampling import SamplingParams

    d = SamplingParams()
    parser.add_argument("-n", "--max-tokens", type=int, default=256, help="tokens to generate (default: 256)")
    parser.add_argument("--temp", type=float, default=d.temperature,
                        help=f"temperature; 0 = greedy, deterministic (default: {d.temperature})")
    parser.add_argument("--top-k", type=int, default=d.top_k, help=f"0 disables (default: {d.top_k})")
    parser.add_argument("--top-p", type=float, default=d.top_p, help=f"1.0 disables (default: {d.top_p})")
    parser.add_argument("--min-p", type=float, default=d.min_p, help=f"0 disables (default: {d.min_p})")
    parser.add_argument("--repeat-penalty", type=float, default=d.repeat_penalty,
                        help=f"1.0 disables (default: {d.repeat_penalty})")
    parser.add_argument("--repeat-last-n", type=int, default=d.repeat_last_n,
                        help=f"tokens the repeat penalty looks back (default: {d.repeat_last_n})")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: random)")
    parser.add_argument("--stop", action="append", default=[], metavar="TEXT",
                        help="stop when this text is generated (repeatable)")


def add_kv_bits_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--kv-bits", type=int, default=None, choices=[8, 4],
                        help="quantize the KV cache to 8 or 4 bits (default: float)")


def sampling_params(args: argparse.Namespace):
    from edgelm.runtime.sampling import SamplingParams

    return SamplingParams(temperature=args.temp, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                          repeat_penalty=args.repeat_penalty, repeat_last_n=args.repeat_last_n, seed=args.seed)


def set_threads(threads: int | None) -> None:
    import torch

    if threads is not None:
        if threads < 1:
            from edgelm.errors import EdgelmError

            raise EdgelmError(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
