"""Exception types. Every message says what was wrong and what to do about it.

The CLI turns any EdgelmError into a one-line message and a non-zero exit code; anything else is a bug.
"""


class EdgelmError(Exception):
    """Base class of all errors edgelm raises on purpose."""


class ModelFormatError(EdgelmError):
    """A model file is malformed: bad magic, truncated, inconsistent offsets, missing keys."""


class UnsupportedArchitecture(EdgelmError):
    """The model's architecture has no implementation in edgelm.models."""


class UnsupportedTensorType(ModelFormatError):
    """A tensor uses a storage type edgelm cannot decode."""


class TokenizerError(EdgelmError):
    """Tokenizer metadata is missing or inconsistent, or a chat template fails to render."""


class ModelNotFound(EdgelmError):
    """A model name is neither in the registry nor an existing file or directory."""


class RegistryError(EdgelmError):
    """Pulling or assembling a registry model failed (install, missing chunk, checksum)."""


class ChecksumMismatch(RegistryError):
    """An assembled or cached file does not have the expected sha256."""


class GenerationError(EdgelmError):
    """Invalid generation request: bad sampling parameters, prompt longer than the context, ..."""


class BenchmarkError(EdgelmError):
    """A benchmark cannot run as asked, e.g. the llama.cpp peer is not installed."""


class RecipeError(EdgelmError):
    """A compression recipe has an unknown step, an unknown field or an invalid value."""


class DeviceError(EdgelmError):
    """The requested device is unknown or not present (e.g. --device cuda on a machine without a GPU)."""
