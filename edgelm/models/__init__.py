"""Architecture registry and the GGUF -> PyTorch model loader."""

from __future__ import annotations

import importlib
from types import ModuleType

import torch

from edgelm.errors import ModelFormatError, UnsupportedArchitecture
from edgelm.io.gguf import GGUFFile
from edgelm.models.base import ModelArgs, Transformer

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


def load_gguf_model(gguf: GGUFFile, dtype: torch.dtype = torch.float32) -> Transformer:
    """Build the model on the meta device and assign dequantized GGUF tensors to it."""
    module = architecture_module(gguf.architecture, str(gguf.path))
    args = model_args(gguf)
    with torch.device("meta"):
        model = module.build(args)
    params = dict(model.named_parameters())
    state = {}
    for param_name, tensor_name in module.tensor_names(args).items():
        expected = tuple(params[param_name].shape)
        state[param_name] = torch.from_numpy(gguf.dequantize(tensor_name, expected)).to(dtype)
    missing = set(params) - set(state)
    if missing:  # a mapping bug, not a user error
        raise ModelFormatError(f"{gguf.path}: no GGUF tensor for parameters {sorted(missing)[:5]}")
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()
