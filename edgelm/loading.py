"""`load(name_or_path)`: registry name, local GGUF file or edgelm model directory -> (model, tokenizer)."""

from __future__ import annotations

from pathlib import Path

from edgelm.errors import ModelFormatError


def load(name_or_path: str | Path, *, pull: bool = True):
    """Load a model and its tokenizer. Registry names are pulled into the cache on first use."""
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
        return load_artifact(path)
    gguf = GGUFFile(path)
    tokenizer = Tokenizer.from_metadata(gguf.metadata, source=str(path))
    model = load_gguf_model(gguf)
    model.source = str(path)
    return model, tokenizer
