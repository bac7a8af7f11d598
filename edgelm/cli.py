"""`edgelm <command>`: a thin dispatcher over the library API.

Each command lives in edgelm/commands/<name>.py with `add_arguments(parser)` and `run(args) -> int`.
Command modules import torch and friends inside `run`, so `--help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line summary). Order is the order shown in --help.
COMMANDS: dict[str, tuple[str, str]] = {
    "models": ("edgelm.commands.models", "list the model registry and what is installed"),
    "pull": ("edgelm.commands.pull", "install a registry model into the local cache"),
    "generate": ("edgelm.commands.generate", "stream a completion for a prompt"),
    "chat": ("edgelm.commands.chat", "chat with a model using its chat template"),
    "perplexity": ("edgelm.commands.perplexity", "perplexity of a text file (llama-perplexity method)"),
    "bench": ("edgelm.commands.bench", "speed and memory benchmark, optionally against llama.cpp"),
    "quantize": ("edgelm.commands.quantize", "quantize a model (RTN, GPTQ, AWQ) into an edgelm model directory"),
    "prune": ("edgelm.commands.prune", "prune a model (magnitude, Wanda, SparseGPT; N:M; structured)"),
    "compress": ("edgelm.commands.compress", "apply a compression recipe (YAML) into an edgelm model directory"),
    "distill": ("edgelm.commands.distill", "train a compressed model against its uncompressed teacher (KD, DWQ)"),
    "export": ("edgelm.commands.export", "write a model as a GGUF file that llama.cpp loads"),
    "eval": ("edgelm.commands.eval", "quality of a compressed model: perplexity, KL divergence, top-1 agreement, size"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgelm",
        description="Small language models on edge devices: load, compress, run, serve, measure.")
    parser.add_argument("--version", action="version", version=f"edgelm {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, summary) in COMMANDS.items():
        sub.add_parser(name, help=summary, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        build_parser().parse_args(argv or ["--help"])  # prints help / usage error and exits
        return 2
    name, rest = argv[0], argv[1:]
    module = importlib.import_module(COMMANDS[name][0])
    parser = argparse.ArgumentParser(prog=f"edgelm {name}", description=COMMANDS[name][1])
    module.add_arguments(parser)
    args = parser.parse_args(rest)
    return run_command(module.run, args)


def run_command(func, args) -> int:
    """Run a command: EdgelmError becomes a one-line message and exit code 1, Ctrl-C exit code 130."""
    from edgelm.errors import EdgelmError

    try:
        return int(func(args) or 0)
    except EdgelmError as exc:
        print(f"edgelm: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("edgelm: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `edgelm generate ... | head`
        return 0


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("edgelm")
    except PackageNotFoundError:
        return "0+unknown"


if __name__ == "__main__":
    sys.exit(main())
