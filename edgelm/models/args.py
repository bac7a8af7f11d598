"""ModelArgs, the hyper-parameters of a decoder-only transformer, and the facts of each architecture that
code without PyTorch needs too (the kernels-only runtime, edgelm/runtime/engine.py)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any


@dataclass
class ModelArgs:
    """Hyper-parameters of a decoder-only transformer, as far as the shared pieces need them."""

    arch: str
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden_dim: int  # feed-forward width
    norm_eps: float = 1e-6
    rope_base: float = 10000.0
    rope_neox: bool = True  # rotate halves (NeoX/Qwen/Gemma) rather than interleaved pairs (GGUF llama)
    max_context: int = 4096
    tie_embeddings: bool = False
    # Sliding-window attention: layer i is local when sliding_window is set and is_local(i).
    sliding_window: int | None = None
    sliding_window_pattern: int | None = None  # every Nth layer is global (gemma3: 6)
    rope_base_local: float | None = None  # rope base of local layers, when it differs
    # Explicit per-layer sliding-window flags, once structured pruning removed layers from the pattern.
    local_layers: list[bool] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def is_local(self, layer: int) -> bool:
        if self.sliding_window is None:
            return False
        if self.local_layers is not None:
            return self.local_layers[layer]
        if not self.sliding_window_pattern:
            return True
        # llama.cpp's rule: in each group of `pattern` layers the last one is global.
        return layer % self.sliding_window_pattern < self.sliding_window_pattern - 1

    def check_context(self, max_len: int) -> None:
        """A KV cache of `max_len` positions fits the model's context, or a GenerationError says so."""
        if max_len > self.max_context:
            from edgelm.errors import GenerationError

            raise GenerationError(f"{max_len} tokens exceed the model's context of {self.max_context}; "
                                  "shorten the prompt or lower --max-tokens")

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


# Feed-forward activation of each architecture: GeGLU (tanh-GELU) for Gemma, SwiGLU for the Llama family.
ACTIVATIONS = {"gemma3": "gelu_tanh", "llama": "silu", "qwen2": "silu"}


def embed_scale(args: ModelArgs) -> float | None:
    """What the embedding rows are multiplied by: Gemma scales them by sqrt(dim)."""
    return math.sqrt(args.dim) if args.arch == "gemma3" else None


def attention_scale(args: ModelArgs) -> float:
    """Query scale: 1/sqrt(head_dim) (Gemma 3's query_pre_attn_scalar is head_dim for these sizes)."""
    return 1.0 / math.sqrt(args.head_dim)
