"""Arguments and helpers shared by the commands."""

from __future__ import annotations

import argparse
import sys


def add_model_argument(parser: argparse.ArgumentParser) -> None:
    from edgelm.registry import DEFAULT_MODEL

    parser.add_argument("-m", "--model", default=DEFAULT_MODEL,
                        help=f"registry name or path to a .gguf file (default: {DEFAULT_MODEL})")


def add_precision_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bits", type=int, default=None,
                        help="precision of an any-precision model directory (e.g. 3 to 8); default: as saved")


def load_model(args: argparse.Namespace, *, for_inference: bool = False, kernels_only: bool = False):
    """(model, tokenizer) for args.model, at args.bits when the command offers --bits. For inference a
    quantized GGUF keeps its own grids (compiled kernels) rather than becoming a float model; with
    `kernels_only`, a model directory the kernels-only runtime can run comes as that runtime (no PyTorch)."""
    import edgelm

    bits = getattr(args, "bits", None)
    device = getattr(args, "device", None)
    if device is not None and device != "cpu":
        from edgelm.runtime.device import resolve_device, to_device

        device = resolve_device(device)
        if device != "cpu":  # the kernels are CPU code: a PyTorch model, made dense on the GPU
            model, tokenizer = edgelm.load(args.model, bits=bits, keep_quantized=for_inference)
            return to_device(model, device), tokenizer
    if kernels_only and bits is None:
        from edgelm.registry import resolve
        from edgelm.runtime.engine import load_engine, unsupported_reason

        path = resolve(args.model)
        if unsupported_reason(path) is None:
            return load_engine(path)
    return edgelm.load(args.model, bits=bits, keep_quantized=for_inference)


def add_device_argument(parser: argparse.ArgumentParser, *, training: bool = False) -> None:
    """--device: where the model runs (inference commands) or, with `training`, where compression runs the
    training loops of float layers."""
    what = ("where the training loops of float layers (distill_weights, qat) run; every other step, and training "
            "packed layers' scales (distill, distill_blackbox), runs on the CPU" if training else
            "where the model runs: cpu (packed weights on the compiled kernels), cuda or cuda:N (dense bfloat16 "
            "weights on the GPU)")
    parser.add_argument("--device", default="cpu", metavar="DEVICE",
                        help=f"{what}; auto: cuda when PyTorch sees a GPU (default: cpu)")


def add_threads_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-t", "--threads", type=int, default=None,
                        help="CPU threads for compute (default: all cores)")


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    from edgelm.runtime.sampling_params import SamplingParams

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


def add_kv_bits_argument(parser: argparse.ArgumentParser, default: int = 16) -> None:
    from edgelm.runtime import KV_BITS

    parser.add_argument("--kv-bits", type=int, default=default, choices=KV_BITS,
                        help=f"KV cache: 32/16 float32/float16, 8/4 quantized (default: {default})")


def sampling_params(args: argparse.Namespace):
    from edgelm.runtime.sampling_params import SamplingParams

    return SamplingParams(temperature=args.temp, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                          repeat_penalty=args.repeat_penalty, repeat_last_n=args.repeat_last_n, seed=args.seed)


def set_threads(threads: int | None, *, pytorch: bool = True) -> None:
    """--threads for edgelm's kernels and (unless the command runs without it) PyTorch."""
    if threads is None:
        return
    if threads < 1:
        from edgelm.errors import EdgelmError

        raise EdgelmError(f"--threads must be >= 1, got {threads}")
    from edgelm import kernels

    kernels.set_threads(threads)
    if pytorch:
        import torch

        torch.set_num_threads(threads)


def add_calibration_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--calib", default=None, metavar="FILE",
                        help="calibration text (never the evaluation text); default: data-free, "
                             "samples generated by the model itself")
    parser.add_argument("--calib-samples", type=int, default=None,
                        help="calibration windows (default: 64 from a file, 8 generated)")
    parser.add_argument("--calib-seq-len", type=int, default=None,
                        help="tokens per window (default: 512 from a file, 128 generated)")


def warn_if_calibrated_on(model, text_file: str) -> None:
    """A model scored on the very text it was calibrated on looks better than it is: say so on stderr."""
    from pathlib import Path

    from edgelm.registry import file_sha256

    records = getattr(model, "artifact_config", {}).get("calibration", [])
    digests = {r.get("sha256") for r in records} - {None}
    path = Path(text_file)
    if digests and path.is_file() and file_sha256(path) in digests:
        print(f"edgelm: warning: {text_file} is the text this model was calibrated on, so its scores here flatter "
              "it; evaluate on held-out text", file=sys.stderr)


def calibration_for(args: argparse.Namespace, model, tokenizer):
    from edgelm.compress.calibration import calibration_from_file, calibration_from_model
    from edgelm.errors import EdgelmError

    for flag, value in (("--calib-samples", args.calib_samples), ("--calib-seq-len", args.calib_seq_len)):
        if value is not None and value < 1:
            raise EdgelmError(f"{flag} must be a positive integer, got {value}")
    from_file = args.calib is not None
    # Data-free: generating is slow on a CPU, hence the smaller defaults.
    samples = args.calib_samples if args.calib_samples is not None else (64 if from_file else 8)
    seq_len = args.calib_seq_len if args.calib_seq_len is not None else (512 if from_file else 128)
    if from_file:
        return calibration_from_file(tokenizer, args.calib, samples, seq_len)
    print(f"edgelm: no --calib file: generating {samples} calibration samples of {seq_len} tokens with the model",
          file=sys.stderr)
    return calibration_from_model(model, tokenizer, samples, seq_len)


def compress_and_save(args: argparse.Namespace, steps, reference_name: str | None = None) -> int:
    """Load args.model, apply the steps (with calibration if one needs it), write args.output, report size.
    With `reference_name`, that model is the teacher of distillation steps (args.model being compressed)."""
    import edgelm
    from edgelm.compress import compress
    from edgelm.io.artifact import check_output_dir, model_size, save_artifact
    from edgelm.runtime.device import resolve_device

    check_output_dir(args.output)
    set_threads(args.threads)
    device = resolve_device(args.device) if getattr(args, "device", None) else None  # before any slow work
    model, tokenizer = edgelm.load(args.model)
    steps[0].check(model)  # refuse an unsuitable model before calibrating (compress() checks each step again)
    calibration = calibration_for(args, model, tokenizer) if any(s.needs_calibration for s in steps) else None
    reference = edgelm.load(reference_name)[0] if reference_name else None
    source = getattr(model, "source", None)
    earlier = getattr(model, "artifact_config", {})
    recipe = [*earlier.get("recipe", []), *(s.to_dict() for s in steps)]
    calibrated_on = [*earlier.get("calibration", []), *([calibration.record()] if calibration is not None else [])]
    model = compress(model, steps, calibration, reference=reference, device=device)  # may be a new (smaller) model
    out = save_artifact(model, tokenizer, args.output, recipe=recipe, source=source, calibration=calibrated_on)
    stats = model_size(model)
    print(f"{out}: {stats['parameters'] / 1e6:.1f}M weights in {stats['bytes'] / 1e6:.1f} MB "
          f"({stats['bits_per_weight']:.2f} bits per weight)")
    return 0
