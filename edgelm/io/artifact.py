"""edgelm's own model directory: what compression writes and every command can load with `-m DIR`.

    DIR/config.json        format + version, architecture and ModelArgs, the layout of every quantized
                           module (bits, group size, shape), the recipe that made it, the source model
    DIR/model.safetensors  the state dict: packed integer codes, scales, zero points, dense tensors
    DIR/tokenizer.json     the tokenizer.* metadata of the source GGUF (rebuilds the same tokenizer)

Writing is atomic: everything goes into a temporary sibling directory that is renamed into place.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgelm.errors import ModelFormatError

FORMAT = "edgelm"
FORMAT_VERSION = 1
CONFIG, WEIGHTS, TOKENIZER = "config.json", "model.safetensors", "tokenizer.json"


def is_artifact(path: str | os.PathLike[str]) -> bool:
    return Path(path, CONFIG).is_file()


def save_artifact(model: nn.Module, tokenizer, out_dir: str | os.PathLike[str], *,
                  recipe: list[dict[str, Any]] | None = None, source: str | None = None) -> Path:
    """Write model + tokenizer to out_dir atomically; an existing artifact there is replaced."""
    from safetensors.torch import save_file

    from edgelm.compress.quant.modules import QuantizedEmbedding, QuantizedLinear

    out_dir = Path(out_dir)
    if out_dir.exists() and not is_artifact(out_dir) and any(out_dir.iterdir()):
        raise ModelFormatError(f"{out_dir}: exists and is not an edgelm model directory; refusing to overwrite "
                               "it, choose another -o")
    layout = {}
    for name, module in model.named_modules():
        if isinstance(module, (QuantizedLinear, QuantizedEmbedding)):
            w = module.weight_q
            layout[name] = {"kind": "embedding" if isinstance(module, QuantizedEmbedding) else "linear",
                            "out_features": w.out_features, "in_features": w.in_features,
                            "bits": w.scheme.bits, "group_size": w.scheme.group_size,
                            "symmetric": w.scheme.symmetric, "bias": getattr(module, "bias", None) is not None}
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "architecture": model.args.arch,
        "model_args": model.args.to_dict(),
        "quantized_modules": layout,
        "recipe": recipe or [],
        "source": source or getattr(model, "source", None),
        "stats": model_size(model),
    }
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".partial", dir=out_dir.parent))
    try:
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        save_file(state, tmp / WEIGHTS, metadata={"format": FORMAT})
        (tmp / TOKENIZER).write_text(json.dumps(tokenizer.metadata))
        (tmp / CONFIG).write_text(json.dumps(config, indent=2))
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            out_dir.rename(old)
            tmp.rename(out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def load_artifact(path: str | os.PathLike[str]):
    """(model, tokenizer) from an artifact directory."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from edgelm.compress.quant.modules import PackedWeight, QuantizedEmbedding, QuantizedLinear
    from edgelm.compress.quant.primitives import QuantScheme
    from edgelm.compress.recipe import replace_module
    from edgelm.models import architecture_module
    from edgelm.models.base import ModelArgs
    from edgelm.tokenizer import Tokenizer

    path = Path(path)
    config = read_config(path)
    module = architecture_module(config["architecture"], str(path))
    args = ModelArgs(**config["model_args"])
    with torch.device("meta"):
        model = module.build(args)
        for name, spec in config["quantized_modules"].items():
            scheme = QuantScheme(spec["bits"], spec["group_size"], spec["symmetric"])
            weight = PackedWeight(spec["out_features"], spec["in_features"], scheme)
            if spec["kind"] == "embedding":
                replace_module(model, name, QuantizedEmbedding(weight))
            else:
                bias = torch.empty(spec["out_features"]) if spec["bias"] else None
                replace_module(model, name, QuantizedLinear(weight, bias))
    try:
        state = load_file(path / WEIGHTS)
    except (OSError, ValueError, RuntimeError, SafetensorError) as exc:
        raise ModelFormatError(f"{path / WEIGHTS}: cannot read ({exc}); the directory is damaged, "
                               "re-create it") from None
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise ModelFormatError(f"{path}: weights do not match config.json ({first}); re-create the "
                               "directory") from None
    model.source = config.get("source")
    model.artifact_config = config
    try:
        metadata = json.loads((path / TOKENIZER).read_text())
    except (OSError, ValueError) as exc:
        raise ModelFormatError(f"{path / TOKENIZER}: cannot read ({exc}); re-create the directory") from None
    return model.eval(), Tokenizer.from_metadata(metadata, source=str(path))


def read_config(path: Path) -> dict[str, Any]:
    try:
        config = json.loads((path / CONFIG).read_text())
    except FileNotFoundError:
        raise ModelFormatError(f"{path}: no {CONFIG}; this is not an edgelm model directory") from None
    except ValueError as exc:
        raise ModelFormatError(f"{path / CONFIG}: not valid JSON ({exc}); re-create the directory") from None
    if config.get("format") != FORMAT:
        raise ModelFormatError(f"{path}: {CONFIG} is not an edgelm model config")
    version = config.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ModelFormatError(f"{path}: written by a newer edgelm (format version {version}, this edgelm "
                               f"reads up to {FORMAT_VERSION}); upgrade edgelm")
    if version < FORMAT_VERSION:
        raise ModelFormatError(f"{path}: format version {version} is older than this edgelm supports "
                               f"({FORMAT_VERSION}); re-create it from the source model")
    return config


def model_size(model: nn.Module) -> dict[str, float]:
    """Weights represented, bytes stored, bits per weight: whole model, embedding included."""
    from edgelm.compress.quant.modules import QuantizedEmbedding, QuantizedLinear

    n_params = n_bytes = 0
    for module in model.modules():
        if isinstance(module, (QuantizedLinear, QuantizedEmbedding)):
            n_params += module.weight_q.out_features * module.weight_q.in_features
            n_bytes += module.weight_q.storage_bytes
    for param in model.parameters():  # dense weights, norms, biases (buffers such as rope tables are not weights)
        n_params += param.numel()
        n_bytes += param.numel() * param.element_size()
    return {"parameters": n_params, "bytes": n_bytes, "bits_per_weight": 8 * n_bytes / max(n_params, 1)}
