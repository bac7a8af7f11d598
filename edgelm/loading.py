"""`load(name_or_path)`: registry name, local GGUF file or edgelm model directory -> (model, tokenizer)."""

from __future__ import annotations

from pathlib import Path

from edgelm.errors import ModelFormatError


def load(name_or_path: str | Path, *, pull: bool = True, bits: int | None = None, keep_quantized: bool = False):
    """Load a model and its tokenizer. Registry names are pulled into the cache on first use.

    `bits` picks the precision of an any-precision model directory (one store, 3- to 8-bit models).
    `keep_quantized` runs a quantized GGUF on its own grids (packed, on the compiled kernels) instead of
    dequantizing it to float: what inference wants; compression and evaluation start from float."""
    from edgelm.io.artifact import is_artifact, load_artifact
    from edgelm.io.gguf import GGUFFile
    from edgelm.models import load_gguf_model
    from edgelm.registry import resolve
    from edgelm.tokenizer import Tokenizer

    path = resolve(str(name_or_path), pull=pull)
    if path.is_dir():
        if not is_artifact(path):
            raise ModelFormatError(f"{path}: a directory without config.json; pass a .gguf file or a "
                                   "directory written by edgelm (quantize/compress -o DIR)")
        model, tokenizer = load_artifact(path)
        if bits is not None:
            _set_bits(model, bits, path)
        release_free_memory()
        return model, tokenizer
    if bits is not None:
        raise ModelFormatError(f"{path}: --bits selects a precision of an any-precision model directory; "
                               "make one with `edgelm quantize --method anyprec -o DIR`")
    gguf = GGUFFile(path)
    tokenizer = Tokenizer.from_metadata(gguf.metadata, source=str(path))
    model = load_gguf_model(gguf, keep_quantized=keep_quantized)
    model.source = str(path)
    del gguf
    release_free_memory()
    return model, tokenizer


def release_free_memory() -> None:
    """Hand the heap's free pages back to the system (glibc keeps what loading freed: ~85 MB of decoding
    temporaries for a 250 MB GGUF). Elsewhere a no-op."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    if hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def _set_bits(model, bits: int, path: Path) -> None:
    from edgelm.compress.quant.anyprec import AnyPrecisionLinear

    layers = [m for m in model.modules() if isinstance(m, AnyPrecisionLinear)]
    if not layers:
        raise ModelFormatError(f"{path}: not an any-precision model, so --bits does not apply; make one with "
                               "`edgelm quantize --method anyprec -o DIR`")
    highest = min(m.weight_ap.max_bits for m in layers)
    # The recipe's min_bits: the lowest precision the directory was made to offer.
    recipe = getattr(model, "artifact_config", {}).get("recipe", [])
    lowest = max((step["anyprec"].get("min_bits", 2) for step in recipe if "anyprec" in step), default=2)
    if not lowest <= bits <= highest:
        raise ModelFormatError(f"{path}: holds {lowest} to {highest} bits per weight, not {bits}; choose --bits in "
                               "that range")
    for layer in layers:
        layer.set_bits(bits)
