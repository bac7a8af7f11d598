"""edgelm: small language models on edge devices.

    import edgelm
    model, tokenizer = edgelm.load("gemma-3-270m")
    print(edgelm.generate(model, tokenizer, "The capital of France is", max_tokens=20))

Names are imported lazily so that `import edgelm` (and the CLI's --help) stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["load", "generate", "stream_generate", "SamplingParams", "perplexity_of_file", "to_device", "EdgelmError"]

_EXPORTS = {
    "load": "edgelm.loading",
    "generate": "edgelm.runtime.generate",
    "stream_generate": "edgelm.runtime.generate",
    "SamplingParams": "edgelm.runtime.sampling",
    "perplexity_of_file": "edgelm.bench.quality",
    "to_device": "edgelm.runtime.device",
    "EdgelmError": "edgelm.errors",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'edgelm' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
