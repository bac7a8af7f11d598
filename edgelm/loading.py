"""`load(name_or_path)`: registry name or local GGUF path -> (model, tokenizer)."""

from __future__ import annotations

from pathlib import Path

from edgelm.errors import ModelFormatError


def load(name_or_path: str | Path, *, pull: bool = True):
    """Load a model and its tokenizer. Registry names are pulled into the cache on first use."""
    from edgelm.io.gguf import GGUFFile
    from edgelm.models import load_gguf_model
    from edgelm.registry import resolve
    from edgelm.tokenizer import Tokenizer

    path = resolve(str(name_or_path), pull=pull)
    if path.is_dir():
        raise ModelFormatError(f"{path}: is a directory; edgelm loads .gguf files (compressed artifact "
                               "directories are not supported yet)")
    gguf = GGUFFile(path)
    tokenizer = Tokenizer.from_metadata(gguf.metadata, source=str(path))
    model = load_gguf_model(gguf)
    model.source = str(path)
    return model, tokenizer
