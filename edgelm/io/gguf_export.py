"""GGUF writing: any edgelm model (GGUF-loaded or compressed) as a GGUF file llama.cpp loads.

Weights are dequantized from whatever edgelm holds and re-quantized to one ggml type with the `gguf`
package's reference quantizers; norms and biases stay F32. Metadata is written with the value types
llama.cpp's loader insists on (unsigned 32-bit counts and ids, 32-bit floats).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgelm.errors import EdgelmError

# ggml types a whole model can be exported to, with llama.cpp's general.file_type for each.
EXPORT_TYPES = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "BF16": 32}


def write_metadata(writer, key: str, value: Any) -> None:
    """One key with the GGUF type llama.cpp expects for it (ints are uint32, floats float32)."""
    if key == "general.architecture":
        return  # GGUFWriter writes it itself
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    elif isinstance(value, list):
        writer.add_array(key, value)  # item type from the first item: str, int32 or float32
    else:
        raise TypeError(f"cannot write metadata {key}={value!r} to GGUF")


def architecture_metadata(args) -> dict[str, Any]:
    """The `{arch}.*` keys llama.cpp reads, from ModelArgs."""
    if args.local_layers is not None and args.local_layers != [
            replace(args, local_layers=None).is_local(i) for i in range(args.n_layers)]:
        raise EdgelmError("this model's layers no longer follow the architecture's sliding-window pattern "
                          "(structured pruning removed layers), which a GGUF cannot describe; export the model "
                          "before dropping layers, or prune with drop_layers: 0")
    keys = {
        "context_length": args.max_context,
        "embedding_length": args.dim,
        "block_count": args.n_layers,
        "feed_forward_length": args.hidden_dim,
        "attention.head_count": args.n_heads,
        "attention.head_count_kv": args.n_kv_heads,
        "attention.key_length": args.head_dim,
        "attention.value_length": args.head_dim,
        "attention.layer_norm_rms_epsilon": float(args.norm_eps),
        "rope.freq_base": float(args.rope_base),
    }
    if args.sliding_window is not None:
        keys["attention.sliding_window"] = args.sliding_window
    return {f"{args.arch}.{k}": v for k, v in keys.items()}


def export_gguf(model, tokenizer, out_path: str | os.PathLike[str], type_name: str = "Q8_0") -> Path:
    """Write the model as a GGUF file of one ggml type (atomically: temp file, then rename)."""
    import gguf
    from gguf.quants import quantize

    from edgelm.models import architecture_module

    type_name = type_name.upper()
    if type_name not in EXPORT_TYPES:
        raise EdgelmError(f"cannot export to ggml type {type_name}; choose one of {', '.join(EXPORT_TYPES)}")
    qtype = gguf.GGMLQuantizationType[type_name]
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    args = model.args
    names = architecture_module(args.arch).tensor_names(args)
    out_path = Path(out_path)
    if out_path.is_dir():
        raise EdgelmError(f"{out_path}: is a directory; pass the path of the .gguf file to write with -o")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out_path.name}.", suffix=".partial", dir=out_path.parent)
    os.close(fd)
    try:
        writer = gguf.GGUFWriter(tmp_name, args.arch)
        metadata = {"general.name": f"{Path(str(getattr(model, 'source', None) or 'model')).stem} ({type_name})",
                    "general.file_type": EXPORT_TYPES[type_name], "general.quantization_version": 2,
                    **architecture_metadata(args), **tokenizer.metadata}
        for key, value in metadata.items():
            write_metadata(writer, key, value)
        for param_name, tensor_name in names.items():
            values = _dense_tensor(model, param_name).numpy()
            if values.ndim == 2 and qtype not in (gguf.GGMLQuantizationType.F32,):
                if values.shape[1] % block:
                    raise EdgelmError(f"tensor {tensor_name} has rows of {values.shape[1]}, not a multiple of "
                                      f"{type_name}'s block of {block}; export to F16 or Q8_0 instead")
                if qtype == gguf.GGMLQuantizationType.F16:
                    writer.add_tensor(tensor_name, values.astype(np.float16))
                else:
                    writer.add_tensor(tensor_name, quantize(values, qtype), raw_dtype=qtype)
            else:
                writer.add_tensor(tensor_name, values)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp_name, out_path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return out_path


def _dense_tensor(model, param_name: str) -> torch.Tensor:
    """A parameter as a float32 tensor, whatever module (dense, quantized, factorized) holds it now."""
    module_name, _, attribute = param_name.rpartition(".")
    module = model.get_submodule(module_name)
    with torch.inference_mode():
        return getattr(module, attribute).detach().float().contiguous()
