"""The Llama / Qwen2 family: pre-norm blocks, grouped-query attention (with q/k/v biases in Qwen2),
SwiGLU, RoPE (interleaved pairs for GGUF 'llama', rotated halves for 'qwen2')."""

from __future__ import annotations

from typing import Any

from torch import nn

from edgelm.models.args import ACTIVATIONS, attention_scale, embed_scale
from edgelm.models.base import (ArchMetadata, Attention, FeedForward, ModelArgs, RMSNorm, Transformer,
                                common_tensor_names)

ARCHITECTURES = ("llama", "qwen2")


def args_from_metadata(metadata: dict[str, Any], source: str) -> ModelArgs:
    meta = ArchMetadata(metadata, source)
    return meta.model_args(
        norm_eps=1e-5, rope_base=10000.0, context=4096,
        # llama.cpp's converter permutes Llama q/k weights to interleaved pairs; Qwen2 keeps NeoX halves.
        rope_neox=meta.arch != "llama",
        extra={"qkv_bias": meta.arch == "qwen2"},
    )


class Block(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attn = Attention(args, qkv_bias=args.extra.get("qkv_bias", False), scale=attention_scale(args))
        self.ffn = FeedForward(args.dim, args.hidden_dim, ACTIVATIONS[args.arch])
        self.attn_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x, cos, sin, mask, input_pos, kv_len):
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, input_pos, kv_len)
        return x + self.ffn(self.ffn_norm(x))


def build(args: ModelArgs) -> Transformer:
    return Transformer(args, [Block(args) for _ in range(args.n_layers)], embed_scale=embed_scale(args))


def tensor_names(args: ModelArgs) -> dict[str, str]:
    """Model parameter name -> GGUF tensor name."""
    names = common_tensor_names(args)
    if args.extra.get("qkv_bias"):
        for i in range(args.n_layers):
            for proj in ("q", "k", "v"):
                names[f"layers.{i}.attn.w{proj}.bias"] = f"blk.{i}.attn_{proj}.bias"
    return names
