"""edgelm compress: apply a recipe (YAML list of steps) and write an edgelm model directory.

    # recipe.yaml
    - awq: {bits: 4, group_size: 64}
    - lorc: {rank: 8}
"""

from __future__ import annotations

import argparse

from edgelm.commands.common import (add_calibration_arguments, add_device_argument, add_model_argument,
                                    add_threads_argument, compress_and_save)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_argument(parser)
    parser.add_argument("--recipe", required=True, help="YAML file: a list of steps, e.g. '- rtn: {bits: 4}'")
    add_calibration_arguments(parser)
    parser.add_argument("-o", "--output", required=True, help="output directory")
    add_device_argument(parser, training=True)
    add_threads_argument(parser)


def load_recipe_file(path: str):
    from pathlib import Path

    import yaml

    from edgelm.compress import parse_recipe
    from edgelm.errors import RecipeError

    try:
        data = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise RecipeError(f"{path}: recipe file not found") from None
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    return parse_recipe(data)


def run(args: argparse.Namespace) -> int:
    return compress_and_save(args, load_recipe_file(args.recipe))
