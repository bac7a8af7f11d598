"""Architecture registry and the GGUF -> PyTorch model loader."""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import TYPE_CHECKING

from edgelm.errors import ModelFormatError, UnsupportedArchitecture
from edgelm.io.gguf import GGUFFile
from edgelm.models.args import ModelArgs

if TYPE_CHECKING:  # the package itself stays importable without PyTorch (edgelm.models.args)
    import torch

    from edgelm.models.base import Transformer

# GGUF general.architecture -> module implementing it (args_from_metadata, build, tensor_names).
ARCHITECTURES: dict[str, str] = {
    "gemma3": "edgelm.models.gemma3",
    "llama": "edgelm.models.llama",
    "qwen2": "edgelm.models.llama",
}


def architecture_module(arch: str, source: str = "model") -> ModuleType:
    try:
        return importlib.import_module(ARCHITECTURES[arch])
    except KeyError:
        raise UnsupportedArchitecture(
            f"{source}: architecture '{arch}' is not supported (supported: {', '.join(sorted(ARCHITECTURES))}); "
            "use a model of a supported family") from None


def model_args(gguf: GGUFFile) -> ModelArgs:
    module = architecture_module(gguf.architecture, str(gguf.path))
    args = module.args_from_metadata(gguf.metadata, str(gguf.path))
    args.tie_embeddings = not gguf.has_tensor("output.weight")
    return args


def load_gguf_model(gguf: GGUFFile, dtype: torch.dtype | None = None, keep_quantized: bool = False) -> Transformer:
    """Build the model on the meta device and assign dequantized GGUF tensors to it.

    keep_quantized: matrices stored in a quantized ggml type that edgelm's packed format can hold
    (Q8_0, Q4_0/1, Q5_0/1, Q4_K, Q6_K) become quantized layers on the file's own grids instead of float
    copies (4-8x less memory; decoding runs on the compiled kernels); everything else is dequantized."""
    import torch

    dtype = dtype or torch.float32
    module = architecture_module(gguf.architecture, str(gguf.path))
    args = model_args(gguf)
    with torch.device("meta"):
        model = module.build(args)
    names = module.tensor_names(args)
    kept = _keep_quantized(model, gguf, names) if keep_quantized else set()
    params = dict(model.named_parameters())
    state = {}
    for param_name, tensor_name in names.items():
        if param_name in kept:
            continue
        expected = tuple(params[param_name].shape)
        state[param_name] = torch.from_numpy(gguf.dequantize(tensor_name, expected)).to(dtype)
        gguf.release(tensor_name)
    missing = set(params) - set(state)
    if missing:  # a mapping bug, not a user error
        raise ModelFormatError(f"{gguf.path}: no GGUF tensor for parameters {sorted(missing)[:5]}")
    model.load_state_dict(state, strict=False, assign=True)
    return model.eval()


def _keep_quantized(model: Transformer, gguf: GGUFFile, names: dict[str, str]) -> set[str]:
    """Swap a quantized layer on the file's grid in for every matrix that has one; their parameter names."""
    import torch
    from torch import nn

    from edgelm.compress.quant.modules import QuantizedEmbedding, QuantizedLinear
    from edgelm.compress.quant.source import packed_from_ggml
    from edgelm.compress.recipe import replace_module

    kept = set()
    for param_name, tensor_name in names.items():
        owner = param_name.removesuffix(".weight")
        layer = model.get_submodule(owner) if owner != param_name else None
        if type(layer) not in (nn.Linear, nn.Embedding):
            continue
        info = gguf.tensors[tensor_name]
        packed = packed_from_ggml(info.type_name, info.data, tuple(layer.weight.shape))
        if packed is None:
            continue
        gguf.release(tensor_name)
        if isinstance(layer, nn.Embedding):
            replace_module(model, owner, QuantizedEmbedding(packed))
        else:
            bias = None if layer.bias is None else torch.empty(layer.out_features, device="meta")
            replace_module(model, owner, QuantizedLinear(packed, bias))  # the bias is loaded with the rest
        kept.add(param_name)
    return kept
