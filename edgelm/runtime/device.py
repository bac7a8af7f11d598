"""Where a PyTorch model runs: the CPU (packed weights on the compiled kernels) or a CUDA GPU.

The kernels are CPU code. On a GPU the packed weights are dequantized once into dense `dtype` matrices on
the device (bfloat16 by default: a 1.5B-parameter model takes ~3.5 GB, little next to a GPU's memory) and
PyTorch's GPU matmuls and attention run the model, with the same static KV cache as on the CPU. That is the
plain path a low-bit GPU kernel would have to beat.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from edgelm.errors import DeviceError

if TYPE_CHECKING:
    import torch

    from edgelm.models.base import Transformer

def resolve_device(name: str | None) -> str:
    """'cpu', 'cuda' or 'cuda:N' for a --device value; 'auto' (or None) picks CUDA when PyTorch sees a GPU."""
    import torch

    name = (name or "auto").strip().lower()
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return "cpu"
    if name == "cuda" or (name.startswith("cuda:") and name[5:].isdigit()):
        if not torch.cuda.is_available():
            raise DeviceError(f"--device {name}: this PyTorch sees no CUDA GPU (a CPU-only build, or no driver); "
                              "install a CUDA build of torch on a GPU machine, or use --device cpu")
        index = int(name[5:]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise DeviceError(f"--device {name}: there are {torch.cuda.device_count()} CUDA devices "
                              f"(cuda:0..cuda:{torch.cuda.device_count() - 1})")
        return name
    raise DeviceError(f"unknown device {name!r}: use cpu, cuda, cuda:N or auto")


def to_device(model: Transformer, device: str, dtype: torch.dtype | None = None) -> Transformer:
    """The model, in place, ready to run inference on `device`.

    On the CPU with no dtype nothing changes (packed weights stay on the kernels). Otherwise every linear
    and embedding layer becomes a dense layer of `dtype` (default bfloat16) on the device, dequantized from
    its packed form once, a layer at a time (no second copy of the whole model in host memory); norms and
    rotary tables stay float32, and the KV cache is kept in `dtype`.
    """
    import torch

    if device == "cpu" and dtype is None:
        return model
    dtype = dtype or torch.bfloat16
    target = torch.device(device)
    with torch.no_grad():
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                dense = _dense_layer(child, dtype)
                if dense is not None:
                    setattr(parent, name, dense.to(target))
        model.to(target)
    for module in model.modules():
        if hasattr(module, "kv_dtype"):
            module.kv_dtype = dtype
            module.kv_quant = None
    model.clear_caches()
    return model


def _dense_layer(module, dtype: torch.dtype):
    """A dense nn.Linear / nn.Embedding of `dtype` for a packed or float one, or None for other modules."""
    from torch import nn

    from edgelm.compress.quant.modules import QuantizedEmbedding, QuantizedLinear

    if isinstance(module, QuantizedLinear):
        weight = module.weight_q.dequantize().to(dtype)
        layer = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
        layer.weight = nn.Parameter(weight, requires_grad=False)
        if module.bias is not None:
            layer.bias = nn.Parameter(module.bias.detach().to(dtype), requires_grad=False)
        return layer
    if isinstance(module, QuantizedEmbedding):
        weight = module.weight_q.dequantize().to(dtype)
        return nn.Embedding(module.num_embeddings, module.embedding_dim, _weight=weight, _freeze=True)
    if isinstance(module, (nn.Linear, nn.Embedding)) and module.weight.dtype != dtype:
        module.to(dtype)
        module.requires_grad_(False)
        return module
    return None
