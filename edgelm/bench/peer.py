"""llama.cpp (through llama-cpp-python) as a drop-in model for edgelm's quality metrics.

`LlamaCppScorer` answers `model(tokens, logits_at=...)` like an edgelm model, so `perplexity()` scores
llama.cpp with exactly the code that scores edgelm.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from edgelm.bench.speed import require_llama_cpp


class LlamaCppScorer:
    def __init__(self, gguf_path: str | Path, ctx: int = 512, threads: int | None = None):
        require_llama_cpp()
        import llama_cpp

        kwargs = {"n_threads": threads, "n_threads_batch": threads} if threads else {}
        self.llm = llama_cpp.Llama(model_path=str(gguf_path), n_ctx=ctx, n_batch=ctx, n_ubatch=ctx,
                                   logits_all=True, verbose=False, **kwargs)
        self.args = SimpleNamespace(max_context=ctx)

    def __call__(self, tokens: torch.Tensor, input_pos=None, logits_at: slice | None = None) -> torch.Tensor:
        ids = tokens[0].tolist()
        self.llm.reset()
        self.llm.eval(ids)
        scores = np.array(self.llm.scores[: len(ids)], dtype=np.float32)
        logits = torch.from_numpy(scores)[None]
        return logits if logits_at is None else logits[:, logits_at]
