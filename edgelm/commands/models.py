"""edgelm models: the registry as a table (or JSON), with what is installed in the cache."""

from __future__ import annotations

import argparse
import json

from edgelm import registry  # light: no torch


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print a JSON list of models, for programs")
    parser.add_argument("--verify", action="store_true",
                        help="hash installed files again instead of trusting the recorded checksums (slow)")


def run(args: argparse.Namespace) -> int:
    rows = []
    for entry in registry.list_models():
        state = registry.install_state(entry.name, verify=args.verify)
        rows.append({
            "name": entry.name,
            "default": entry.default,
            "description": entry.description,
            "architecture": entry.architecture,
            "parameters": entry.parameters,
            "file_size": entry.file_size,
            "quant_type": entry.quant_type,
            "sha256": entry.sha256,
            "license": entry.license,
            "packages": [chunk.requirement for chunk in entry.chunks],
            "path": str(registry.model_path(entry.name)),
            "installed": state == "installed",
            "state": state,
        })
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        _print_table(rows)
    # A failed verification is worth a non-zero exit for scripts.
    return 1 if args.verify and any(row["state"] == "corrupt" for row in rows) else 0


def _print_table(rows: list[dict]) -> None:
    header = ("NAME", "ARCH", "PARAMS", "SIZE", "QUANT", "INSTALLED")
    states = {"installed": "yes", "missing": "no", "unverified": "yes (not verified)",
              "corrupt": "corrupt (pull --force)"}
    lines = [(row["name"] + (" *" if row["default"] else ""), row["architecture"],
              registry.format_count(row["parameters"]), registry.format_bytes(row["file_size"]),
              row["quant_type"], states[row["state"]]) for row in rows]
    widths = [max(len(line[i]) for line in [header, *lines]) for i in range(len(header))]
    for line in [header, *lines]:
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip())
    print(f"\n* default model. Cache: {registry.cache_dir() / 'models'} (set {registry.HOME_ENV} to move it)")
