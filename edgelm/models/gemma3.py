"""Gemma 3 (text): interleaved sliding-window (local) and global attention, QK-norm, sandwich norms,
GeGLU, embeddings scaled by sqrt(dim), tied output, rope base 10k on local and 1M on global layers."""

from __future__ import annotations

from typing import Any

from torch import nn

from edgelm.models.args import ACTIVATIONS, attention_scale, embed_scale
from edgelm.models.base import (ArchMetadata, Attention, FeedForward, ModelArgs, RMSNorm, Transformer,
                                common_tensor_names)

ARCHITECTURES = ("gemma3",)

# Values llama.cpp hard-codes for Gemma 3 rather than reading them from the file.
_LOCAL_ROPE_BASE = 10000.0
_SLIDING_WINDOW_PATTERN = 6


def args_from_metadata(metadata: dict[str, Any], source: str) -> ModelArgs:
    meta = ArchMetadata(metadata, source)
    return meta.model_args(
        norm_eps=1e-6, rope_base=1_000_000.0, context=32768,
        rope_base_local=_LOCAL_ROPE_BASE,
        rope_neox=True,
        sliding_window=meta.get("attention.sliding_window", 512),
        sliding_window_pattern=_SLIDING_WINDOW_PATTERN,
        extra={"final_logit_softcapping": meta.get("final_logit_softcapping", None)},
    )


class Block(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attn = Attention(args, qk_norm=True, scale=attention_scale(args))
        self.ffn = FeedForward(args.dim, args.hidden_dim, ACTIVATIONS[args.arch])
        self.attn_norm = RMSNorm(args.dim, args.norm_eps)
        self.post_attn_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.post_ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x, cos, sin, mask, input_pos, kv_len):
        x = x + self.post_attn_norm(self.attn(self.attn_norm(x), cos, sin, mask, input_pos, kv_len))
        return x + self.post_ffn_norm(self.ffn(self.ffn_norm(x)))


def build(args: ModelArgs) -> Transformer:
    return Transformer(args, [Block(args) for _ in range(args.n_layers)], embed_scale=embed_scale(args),
                       final_softcap=args.extra.get("final_logit_softcapping"))


def tensor_names(args: ModelArgs) -> dict[str, str]:
    """Model parameter name -> GGUF tensor name."""
    names = common_tensor_names(args)
    for i in range(args.n_layers):
        p, g = f"layers.{i}.", f"blk.{i}."
        names.update({
            p + "attn.q_norm.weight": g + "attn_q_norm.weight",
            p + "attn.k_norm.weight": g + "attn_k_norm.weight",
            p + "post_attn_norm.weight": g + "post_attention_norm.weight",
            p + "post_ffn_norm.weight": g + "post_ffw_norm.weight",
        })
    return names
