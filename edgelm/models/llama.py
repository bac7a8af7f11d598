"""The Llama / Qwen2 family: pre-norm blocks, grouped-query attention (with q/k/v biases in Qwen2),
SwiGLU, RoPE (interleaved pairs for GGUF 'llama', rotated halves for 'qwen2')."""

from __future__ import annotations

from typing import Any

from torch import nn

from edgelm.models.base import (Attention, FeedForward, ModelArgs, RMSNorm, Transformer, common_tensor_names,
                                metadata_value)

ARCHITECTURES = ("llama", "qwen2")


def args_from_metadata(metadata: dict[str, Any], source: str) -> ModelArgs:
    arch = metadata["general.architecture"]

    def get(key: str, default: Any = ...) -> Any:
        return metadata_value(metadata, f"{arch}.{key}", source, default)

    n_heads = get("attention.head_count")
    dim = get("embedding_length")
    return ModelArgs(
        arch=arch,
        vocab_size=len(metadata_value(metadata, "tokenizer.ggml.tokens", source)),
        dim=dim,
        n_layers=get("block_count"),
        n_heads=n_heads,
        n_kv_heads=get("attention.head_count_kv", n_heads),
        head_dim=get("attention.key_length", dim // n_heads),
        hidden_dim=get("feed_forward_length"),
        norm_eps=get("attention.layer_norm_rms_epsilon", 1e-5),
        rope_base=get("rope.freq_base", 10000.0),
        # llama.cpp's converter permutes Llama q/k weights to interleaved pairs; Qwen2 keeps NeoX halves.
        rope_neox=arch != "llama",
        max_context=get("context_length", 4096),
        tie_embeddings=True,  # replaced by False in load_state when the file has output.weight
        extra={"qkv_bias": arch == "qwen2"},
    )


class Block(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attn = Attention(args, qkv_bias=args.extra.get("qkv_bias", False))
        self.ffn = FeedForward(args.dim, args.hidden_dim, "silu")
        self.attn_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x, cos, sin, mask, input_pos, kv_len):
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, input_pos, kv_len)
        return x + self.ffn(self.ffn_norm(x))


def build(args: ModelArgs) -> Transformer:
    return Transformer(args, [Block(args) for _ in range(args.n_layers)])


def tensor_names(args: ModelArgs) -> dict[str, str]:
    """Model parameter name -> GGUF tensor name."""
    names = common_tensor_names(args)
    if args.extra.get("qkv_bias"):
        for i in range(args.n_layers):
            for proj in ("q", "k", "v"):
                names[f"layers.{i}.attn.w{proj}.bias"] = f"blk.{i}.attn_{proj}.bias"
    return names
