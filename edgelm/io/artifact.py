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
from typing import TYPE_CHECKING, Any

from edgelm.errors import ModelFormatError

if TYPE_CHECKING:  # reading a directory's config and tokenizer needs no PyTorch (edgelm/runtime/engine.py)
    from torch import nn

FORMAT = "edgelm"
FORMAT_VERSION = 4  # 2: packed codes may be stored in the kernels' plane layout; 3: planes by quads of 256 codes;
                    # 4: a row tier may be low-rank (coefficients over a basis)
OLDEST_READABLE = 1
CONFIG, WEIGHTS, TOKENIZER = "config.json", "model.safetensors", "tokenizer.json"


def is_artifact(path: str | os.PathLike[str]) -> bool:
    return Path(path, CONFIG).is_file()


def check_output_dir(out_dir: str | os.PathLike[str]) -> Path:
    """The directory a model may be written to: new, empty, or an edgelm model directory (replaced). Checked
    before any long work, so that a bad -o fails in a second, not after the compression."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ModelFormatError(f"{out_dir}: exists and is a file, not a directory; choose another -o")
    if out_dir.exists() and not is_artifact(out_dir) and any(out_dir.iterdir()):
        raise ModelFormatError(f"{out_dir}: exists and is not an edgelm model directory; refusing to overwrite "
                               "it, choose another -o")
    return out_dir


def save_artifact(model: nn.Module, tokenizer, out_dir: str | os.PathLike[str], *,
                  recipe: list[dict[str, Any]] | None = None, source: str | None = None,
                  calibration: list[dict[str, Any]] | None = None) -> Path:
    """Write model + tokenizer to out_dir atomically; an existing artifact there is replaced. `calibration`:
    the texts the recipe calibrated on (Calibration.record()), oldest first."""
    from safetensors.torch import save_file

    out_dir = check_output_dir(out_dir)
    _plane_layout(model)
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "architecture": model.args.arch,
        "model_args": model.args.to_dict(),
        "quantized_modules": module_layout(model),
        "recipe": recipe or [],
        "source": source or getattr(model, "source", None),
        "calibration": calibration or [],
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


def _plane_layout(model: nn.Module) -> None:
    """Packed weights go to disk in the kernels' plane layout where their width allows (the same bytes),
    so that loading needs no conversion and keeps a single copy of the codes."""
    from edgelm.compress.quant.modules import PackedWeight

    for module in model.modules():
        if type(module) is PackedWeight:
            module.to_plane_layout()


def load_artifact(path: str | os.PathLike[str]):
    """(model, tokenizer) from an artifact directory."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from edgelm.compress.recipe import replace_module
    from edgelm.models import architecture_module
    from edgelm.models.args import ModelArgs
    from edgelm.tokenizer import Tokenizer

    path = Path(path)
    config = read_config(path)
    module = architecture_module(config["architecture"], str(path))
    args = ModelArgs(**config["model_args"])
    with torch.device("meta"):
        model = module.build(args)
        for name, spec in config["quantized_modules"].items():
            replace_module(model, name, _build_module(spec))
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
    return model.eval(), Tokenizer.from_metadata(read_tokenizer_metadata(path), source=str(path))


# safetensors dtype -> numpy dtype (bfloat16 has none: such tensors are left out of map_weights).
_NUMPY_DTYPES = {"U8": "uint8", "I8": "int8", "F16": "float16", "F32": "float32", "I32": "int32",
                 "I64": "int64", "F64": "float64", "BOOL": "bool"}


def map_weights(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The tensors of DIR/model.safetensors as read-only numpy arrays over one memory map of the file (no
    copy: pages are read when first touched and stay shared with the page cache)."""
    import numpy as np

    file = Path(path) / WEIGHTS
    try:
        with open(file, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(header_len))
        data = np.memmap(file, dtype=np.uint8, mode="r")
    except (OSError, ValueError) as exc:
        raise ModelFormatError(f"{file}: cannot read ({exc}); the directory is damaged, re-create it") from None
    base = 8 + header_len
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__" or info.get("dtype") not in _NUMPY_DTYPES:
            continue
        begin, end = info["data_offsets"]
        if base + end > data.size:
            raise ModelFormatError(f"{file}: tensor {name} runs past the end of the file; re-create the directory")
        tensors[name] = data[base + begin:base + end].view(_NUMPY_DTYPES[info["dtype"]]).reshape(info["shape"])
    return tensors


def read_tokenizer_metadata(path: Path) -> dict[str, Any]:
    """The tokenizer.* GGUF metadata a model directory keeps (enough to rebuild its tokenizer)."""
    try:
        return json.loads((Path(path) / TOKENIZER).read_text())
    except (OSError, ValueError) as exc:
        raise ModelFormatError(f"{path / TOKENIZER}: cannot read ({exc}); re-create the directory") from None


def module_layout(model: nn.Module) -> dict[str, dict[str, Any]]:
    """config.json "quantized_modules": how to rebuild every module that is not the architecture's own.

    kinds: "linear" / "embedding" (packed quantized weight), "lowrank" (U V factors of a Linear), "lorc"
    (a quantized linear or embedding, "wraps", plus a float16 rank-r correction U V).
    """
    from edgelm.compress.lowrank import LoRCEmbedding, LoRCLinear, LowRankLinear
    from edgelm.compress.quant.anyprec import AnyPrecisionLinear
    from edgelm.compress.quant.modules import QuantizedEmbedding, QuantizedLinear
    from edgelm.kernels import dtype_name

    layout: dict[str, dict[str, Any]] = {}
    inside_wrappers: set[str] = set()  # quantized children of LoRC modules, rebuilt with their wrapper
    for name, module in model.named_modules():
        if name in inside_wrappers:
            continue
        if isinstance(module, (LoRCLinear, LoRCEmbedding)):
            inner = _quantized_spec(module.quantized)
            layout[name] = {"kind": "lorc", "wraps": inner.pop("kind"), **inner, "rank": module.rank}
            inside_wrappers.add(f"{name}.quantized" if name else "quantized")
        elif isinstance(module, (QuantizedLinear, QuantizedEmbedding)):
            layout[name] = _quantized_spec(module)
        elif isinstance(module, AnyPrecisionLinear):
            w = module.weight_ap
            layout[name] = {"kind": "anyprec", "wraps": "embedding" if module.embedding else "linear",
                            "out_features": w.out_features, "in_features": w.in_features,
                            "max_bits": w.max_bits, "group_size": w.group_size, "bits": module.bits,
                            "bias": module.bias is not None}
        elif isinstance(module, LowRankLinear):
            layout[name] = {"kind": "lowrank", "out_features": module.out_features,
                            "in_features": module.in_features, "rank": module.rank,
                            "bias": module.bias is not None, "dtype": dtype_name(module.U)}
    return layout


def _quantized_spec(module: nn.Module) -> dict[str, Any]:
    from edgelm.compress.quant.modules import LowRankRows, QuantizedEmbedding, RowTieredWeight

    w = module.weight_q
    spec = {"kind": "embedding" if isinstance(module, QuantizedEmbedding) else "linear",
            "out_features": w.out_features, "in_features": w.in_features,
            "bias": getattr(module, "bias", None) is not None}
    if isinstance(w, RowTieredWeight):  # rows split into tiers, each packed in its own format (or low-rank)
        spec["tiers"] = [{"rows": part.out_features, "kind": "lowrank", "rank": part.rank,
                          **_packed_format(part.coefficients)} if isinstance(part, LowRankRows)
                         else {"rows": part.out_features, **_packed_format(part)} for part in w.parts]
    else:
        spec.update(_packed_format(w))
    return spec


def _packed_format(w: nn.Module) -> dict[str, Any]:
    from edgelm.kernels import dtype_name

    spec = {"bits": w.scheme.bits, "group_size": w.scheme.group_size, "symmetric": w.scheme.symmetric}
    if getattr(w, "layout", "dense") != "dense":
        spec["layout"] = w.layout
    if dtype_name(w.zeros) != "uint8":  # fractional zero points (ggml's Q4_K/Q4_1 grids, any-precision)
        spec["zero_dtype"] = dtype_name(w.zeros)
    return spec


def _build_module(spec: dict[str, Any]) -> nn.Module:
    """An empty module of the layout entry's kind and shapes (on the current device), for load_state_dict."""
    import torch

    from edgelm.compress.lowrank import LoRCEmbedding, LoRCLinear, LowRankLinear
    from edgelm.compress.quant.modules import (
        LowRankRows,
        PackedWeight,
        QuantizedEmbedding,
        QuantizedLinear,
        RowTieredWeight,
    )
    from edgelm.compress.quant.primitives import QuantScheme

    kind = spec["kind"]
    if kind == "anyprec":
        from edgelm.compress.quant.anyprec import AnyPrecisionLinear, AnyPrecisionWeight

        weight = AnyPrecisionWeight(spec["out_features"], spec["in_features"], spec["max_bits"], spec["group_size"])
        bias = torch.empty(spec["out_features"]) if spec["bias"] else None
        return AnyPrecisionLinear(weight, bias, spec["bits"], embedding=spec["wraps"] == "embedding")
    if kind == "lowrank":
        return LowRankLinear.empty(spec["out_features"], spec["in_features"], spec["rank"], spec["bias"],
                                   getattr(torch, spec.get("dtype", "float32")))
    if kind == "lorc":
        inner = _build_module({**spec, "kind": spec["wraps"]})
        U = torch.empty(spec["out_features"], spec["rank"], dtype=torch.float16)
        V = torch.empty(spec["rank"], spec["in_features"], dtype=torch.float16)
        return (LoRCEmbedding if spec["wraps"] == "embedding" else LoRCLinear)(inner, U, V)
    def packed(rows: int, fmt: dict[str, Any], cols: int | None = None) -> PackedWeight:
        scheme = QuantScheme(fmt["bits"], fmt["group_size"], fmt["symmetric"])
        weight = PackedWeight(rows, cols or spec["in_features"], scheme,
                              zero_dtype=getattr(torch, fmt.get("zero_dtype", "uint8")))
        weight.layout = fmt.get("layout", "dense")
        return weight

    def tier(fmt: dict[str, Any]) -> nn.Module:
        if fmt.get("kind") == "lowrank":
            return LowRankRows(packed(fmt["rows"], fmt, fmt["rank"]), torch.zeros(fmt["rank"], spec["in_features"]))
        return packed(fmt["rows"], fmt)

    if "tiers" in spec:
        weight = RowTieredWeight([tier(t) for t in spec["tiers"]], torch.zeros(spec["out_features"], dtype=torch.uint8))
    else:
        weight = packed(spec["out_features"], spec)
    if kind == "embedding":
        return QuantizedEmbedding(weight)
    if kind == "linear":
        return QuantizedLinear(weight, torch.empty(spec["out_features"]) if spec["bias"] else None)
    raise ModelFormatError(f"unknown module kind '{kind}' in config.json; written by a newer edgelm? upgrade it")


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
    if version < OLDEST_READABLE:
        raise ModelFormatError(f"{path}: format version {version} is older than this edgelm supports "
                               f"({OLDEST_READABLE}..{FORMAT_VERSION}); re-create it from the source model")
    if version == 2:  # version 2's plane layout went chunk by chunk: read as such, converted on first use
        for spec in config.get("quantized_modules", {}).values():
            for fmt in [spec, *spec.get("tiers", [])]:
                if fmt.get("layout") == "planes":
                    fmt["layout"] = "chunk-planes"
    return config


def model_size(model: nn.Module) -> dict[str, float]:
    """Weights represented, bytes stored, bits per weight: whole model, embedding included."""
    from edgelm.compress.lowrank import LoRCEmbedding, LoRCLinear, LowRankLinear
    from edgelm.compress.quant.anyprec import AnyPrecisionLinear
    from edgelm.compress.quant.modules import QuantizedEmbedding, QuantizedLinear

    n_params = n_bytes = 0
    factor_params: set[int] = set()  # LowRankLinear factors, counted with their layer below
    for module in model.modules():
        if isinstance(module, AnyPrecisionLinear):  # one store holds every precision: count the store
            n_params += module.out_features * module.in_features
            n_bytes += module.storage_bytes
        elif isinstance(module, (QuantizedLinear, QuantizedEmbedding)):
            n_params += module.weight_q.out_features * module.weight_q.in_features
            n_bytes += module.weight_q.storage_bytes
        elif isinstance(module, (LoRCLinear, LoRCEmbedding)):
            # The correction adds stored bytes to weights its quantized child already counts.
            n_bytes += sum(t.numel() * t.element_size() for t in (module.U, module.V))
        elif isinstance(module, LowRankLinear):
            # A factorized layer represents the out x in weights of the Linear it replaced.
            n_params += module.out_features * module.in_features
            n_bytes += sum(t.numel() * t.element_size() for t in (module.U, module.V))
            factor_params.update((id(module.U), id(module.V)))
    for param in model.parameters():  # dense weights, norms, biases (buffers such as rope tables are not weights)
        if id(param) in factor_params:
            continue
        n_params += param.numel()
        n_bytes += param.numel() * param.element_size()
    return {"parameters": n_params, "bytes": n_bytes, "bits_per_weight": 8 * n_bytes / max(n_params, 1)}
