"""edgelm distill: train a compressed model against its uncompressed teacher, into a new model directory.

    edgelm quantize -m gemma-3-270m --method rtn --bits 4 -o q4
    edgelm distill -m q4 --method scales --steps 100 --calib ../shared/data/wikitext-2/valid.txt -o q4-dwq

Methods: scales (white-box KD of the quantization scales, as DWQ), weights (white-box KD of the float
weights, after structured pruning), blackbox (the teacher writes text, the student learns it).
"""

from __future__ import annotations

import argparse

from edgelm.commands.common import (add_calibration_arguments, add_device_argument, add_model_argument,
                                    add_threads_argument)

METHODS = {"scales": "distill", "weights": "distill_weights", "blackbox": "distill_blackbox"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_argument(parser)
    parser.add_argument("--teacher", default=None,
                        help="uncompressed model (default: the source recorded in the model directory)")
    parser.add_argument("--method", default="scales", choices=sorted(METHODS),
                        help="what is trained (default: scales)")
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps (default: 100)")
    parser.add_argument("--lr", type=float, default=None, help="learning rate (default: the method's)")
    add_calibration_arguments(parser)
    parser.add_argument("-o", "--output", required=True, help="output directory")
    add_device_argument(parser, training=True)
    add_threads_argument(parser)


def run(args: argparse.Namespace) -> int:
    import edgelm
    from edgelm.commands.common import compress_and_save
    from edgelm.compress import parse_recipe
    from edgelm.errors import EdgelmError

    fields = {"steps": args.steps, **({"lr": args.lr} if args.lr is not None else {})}
    steps = parse_recipe([{METHODS[args.method]: fields}])
    teacher = args.teacher
    if teacher is None:
        student, _ = edgelm.load(args.model)
        teacher = getattr(student, "source", None)
        del student
        if teacher is None:
            raise EdgelmError(f"{args.model} records no source model to learn from; pass --teacher MODEL")
    return compress_and_save(args, steps, reference_name=teacher)
