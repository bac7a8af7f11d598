"""Pieces shared by every architecture: ModelArgs, RMSNorm, rotary embeddings, attention, static KV cache.

One architecture = one file (gemma3.py, llama.py) that reads its hyper-parameters from GGUF metadata,
assembles blocks from these pieces and names the GGUF tensors its parameters come from. Linear layers are
plain `nn.Linear` modules, so compression can swap in quantized layers module by module.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from edgelm.errors import GenerationError, ModelFormatError
from edgelm.models.args import ModelArgs


def common_tensor_names(args: ModelArgs) -> dict[str, str]:
    """Parameter name -> GGUF tensor name for what every architecture here has."""
    names = {"tok_embeddings.weight": "token_embd.weight", "norm.weight": "output_norm.weight"}
    if not args.tie_embeddings:
        names["output.weight"] = "output.weight"
    for i in range(args.n_layers):
        p, g = f"layers.{i}.", f"blk.{i}."
        names.update({
            p + "attn.wq.weight": g + "attn_q.weight",
            p + "attn.wk.weight": g + "attn_k.weight",
            p + "attn.wv.weight": g + "attn_v.weight",
            p + "attn.wo.weight": g + "attn_output.weight",
            p + "attn_norm.weight": g + "attn_norm.weight",
            p + "ffn_norm.weight": g + "ffn_norm.weight",
            p + "ffn.w_gate.weight": g + "ffn_gate.weight",
            p + "ffn.w_up.weight": g + "ffn_up.weight",
            p + "ffn.w_down.weight": g + "ffn_down.weight",
        })
    return names


class ArchMetadata:
    """Reads `{arch}.*` hyper-parameters; a missing required key is a ModelFormatError naming it."""

    def __init__(self, metadata: dict[str, Any], source: str):
        self.metadata, self.source = metadata, source
        self.arch = metadata["general.architecture"]

    def get(self, key: str, default: Any = ...) -> Any:
        return metadata_value(self.metadata, f"{self.arch}.{key}", self.source, default)

    def model_args(self, *, norm_eps: float, rope_base: float, context: int, **overrides: Any) -> ModelArgs:
        """ModelArgs from the keys every architecture shares; the defaults are llama.cpp's for the arch."""
        n_heads = self.get("attention.head_count")
        dim = self.get("embedding_length")
        common = dict(
            arch=self.arch,
            vocab_size=len(metadata_value(self.metadata, "tokenizer.ggml.tokens", self.source)),
            dim=dim,
            n_layers=self.get("block_count"),
            n_heads=n_heads,
            n_kv_heads=self.get("attention.head_count_kv", n_heads),
            head_dim=self.get("attention.key_length", dim // n_heads),
            hidden_dim=self.get("feed_forward_length"),
            norm_eps=self.get("attention.layer_norm_rms_epsilon", norm_eps),
            rope_base=self.get("rope.freq_base", rope_base),
            max_context=self.get("context_length", context),
        )
        return ModelArgs(**{**common, **overrides})


def metadata_value(metadata: dict[str, Any], key: str, source: str, default: Any = ...) -> Any:
    """A GGUF metadata value; a missing required key is a ModelFormatError naming it."""
    if key in metadata:
        return metadata[key]
    if default is ...:
        raise ModelFormatError(f"{source}: required metadata key '{key}' is missing; re-convert the model "
                               "with a current llama.cpp converter")
    return default


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in float32. GGUF converters already fold Gemma's (1 + w) into w."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (out * self.weight).to(x.dtype)


def rope_inv_freq(head_dim: int, base: float) -> torch.Tensor:
    # Explicit device: models are built under torch.device("meta") and this buffer is not loaded.
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float64, device="cpu") / head_dim
    return 1.0 / (base ** exponents)


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # Angles in float64: positions up to 32k times small frequencies lose digits in float32.
    angles = positions.to(torch.float64)[:, None] * inv_freq[None, :]
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, neox: bool) -> torch.Tensor:
    """Rotate x [B, H, T, D] by per-position angles cos/sin [T, D/2]."""
    if neox:
        x1, x2 = x.float().chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)
    xf = x.float().unflatten(-1, (-1, 2))
    x1, x2 = xf[..., 0], xf[..., 1]
    return torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2).to(x.dtype)


class KVCache(nn.Module):
    """Static key/value buffers [B, n_kv_heads, max_len, head_dim], written in place at input_pos."""

    def __init__(self, batch: int, n_kv_heads: int, max_len: int, head_dim: int, dtype: torch.dtype):
        super().__init__()
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype), persistent=False)

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_len: int):
        self.k.index_copy_(2, input_pos, k.to(self.k.dtype))
        self.v.index_copy_(2, input_pos, v.to(self.v.dtype))
        return self.k[:, :, :kv_len], self.v[:, :, :kv_len]


def attention_mask(q_pos: torch.Tensor, kv_len: int, window: int | None) -> torch.Tensor:
    """Boolean [T, kv_len] mask: True where query at q_pos may attend key position j.

    Causal, and for sliding-window layers only the last `window` positions (q - j < window), which is
    llama.cpp's and Hugging Face's convention for Gemma.
    """
    kv_pos = torch.arange(kv_len, device=q_pos.device)
    mask = kv_pos[None, :] <= q_pos[:, None]
    if window is not None:
        mask &= (q_pos[:, None] - kv_pos[None, :]) < window
    return mask


class Attention(nn.Module):
    """Grouped-query attention with optional q/k biases, per-head q/k RMSNorm (Gemma 3) and a KV cache."""

    def __init__(self, args: ModelArgs, *, qkv_bias: bool = False, qk_norm: bool = False,
                 scale: float | None = None):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=qkv_bias)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=qkv_bias)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=qkv_bias)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)
        self.q_norm = RMSNorm(args.head_dim, args.norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(args.head_dim, args.norm_eps) if qk_norm else None
        self.scale = scale if scale is not None else 1.0 / math.sqrt(args.head_dim)
        self.rope_neox = args.rope_neox
        self.kv_cache: nn.Module | None = None
        self.kv_quant = None  # QuantScheme of a quantized KV cache (see runtime/kv_cache.py), None = float
        self.kv_dtype = torch.float32  # of a float cache (float16 halves its memory, as llama.cpp's default)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor,
                input_pos: torch.Tensor, kv_len: int) -> torch.Tensor:
        bsz, seqlen, _ = x.shape
        q = self.wq(x).view(bsz, seqlen, self.n_heads, self.head_dim)
        k = self.wk(x).view(bsz, seqlen, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(bsz, seqlen, self.n_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        q = apply_rope(q, cos, sin, self.rope_neox)
        k = apply_rope(k, cos, sin, self.rope_neox)
        if self.kv_cache is not None:
            k, v = self.kv_cache.update(input_pos, k, v, kv_len)
        elif self.kv_quant is not None:  # no cache (perplexity): see exactly what a quantized cache returns
            from edgelm.runtime.kv_cache import fake_quantize_kv

            k, v = fake_quantize_kv(k, self.kv_quant), fake_quantize_kv(v, self.kv_quant)
        elif self.kv_dtype != k.dtype:  # no cache: the rounding a float16 cache applies
            k, v = k.to(self.kv_dtype), v.to(self.kv_dtype)
        out = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask,
                                             scale=self.scale, enable_gqa=self.n_heads != self.n_kv_heads)
        return self.wo(out.transpose(1, 2).reshape(bsz, seqlen, -1))


class FeedForward(nn.Module):
    """Gated feed-forward: down(act(gate(x)) * up(x)); SwiGLU with silu, GeGLU with tanh-GELU."""

    def __init__(self, dim: int, hidden_dim: int, activation: str):
        super().__init__()
        self.w_gate = nn.Linear(dim, hidden_dim, bias=False)
        self.w_up = nn.Linear(dim, hidden_dim, bias=False)
        self.w_down = nn.Linear(hidden_dim, dim, bias=False)
        self.activation = activation
        if activation == "silu":
            self.act = F.silu
        elif activation == "gelu_tanh":
            self.act = lambda x: F.gelu(x, approximate="tanh")
        else:
            raise ValueError(f"unknown activation {activation!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_down(self.act(self.w_gate(x)) * self.w_up(x))


class Transformer(nn.Module):
    """Embedding, blocks, final norm and output head; architectures supply the blocks.

    forward(tokens, input_pos) runs with the KV caches when `setup_caches` was called (generation) and
    without them otherwise (perplexity over independent chunks). `logits_at` picks the positions whose
    logits are needed: the output matrix is the largest in a small model, so prefill applies it to the
    last position only.
    """

    def __init__(self, args: ModelArgs, blocks: list[nn.Module], embed_scale: float | None = None,
                 final_softcap: float | None = None):
        super().__init__()
        self.args = args
        # Weights always come from a file: skip the random init (on the meta device it would import
        # torch._dynamo, a second of start-up).
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim, _weight=torch.empty(args.vocab_size, args.dim))
        self.layers = nn.ModuleList(blocks)
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = None if args.tie_embeddings else nn.Linear(args.dim, args.vocab_size, bias=False)
        self.embed_scale = embed_scale
        self.final_softcap = final_softcap
        self.register_buffer("inv_freq", rope_inv_freq(args.head_dim, args.rope_base), persistent=False)
        local_base = args.rope_base_local or args.rope_base
        self.register_buffer("inv_freq_local", rope_inv_freq(args.head_dim, local_base), persistent=False)
        self.cache_len = 0  # capacity of the KV caches, 0 when none are set up

    # -- caches -----------------------------------------------------------------------------------------
    def setup_caches(self, max_len: int, batch: int = 1, dtype: torch.dtype | None = None) -> None:
        """Static KV caches for `max_len` positions: quantized (set_kv_bits 8/4) or float in `dtype`
        (default: the layers' kv_dtype, set_kv_bits 32/16)."""
        self.args.check_context(max_len)
        for layer in self.layers:
            if layer.attn.kv_quant is not None:
                from edgelm.runtime.kv_cache import QuantizedKVCache

                cache = QuantizedKVCache(batch, self.args.n_kv_heads, max_len, self.args.head_dim,
                                         layer.attn.kv_quant)
            else:
                cache = KVCache(batch, self.args.n_kv_heads, max_len, self.args.head_dim,
                                dtype or layer.attn.kv_dtype)
            layer.attn.kv_cache = cache if self.device.type == "cpu" else cache.to(self.device)
        self.cache_len = max_len
        self._release_compiled_step()

    def set_kv_bits(self, bits: int | None) -> None:
        """The KV cache from the next setup_caches on: 32 (or None) float32, 16 float16, 8 or 4 quantized."""
        from edgelm.runtime.kv_cache import kv_scheme

        scheme = kv_scheme(bits, self.args.head_dim)
        for layer in self.layers:
            layer.attn.kv_quant = scheme
            layer.attn.kv_dtype = torch.float16 if bits == 16 else torch.float32

    def _release_compiled_step(self) -> None:
        """Forget the compiled decode step (runtime/native.py) built for the caches being replaced."""
        self.__dict__.pop("_native_decoder", None)
        self.restore_torch_threads()

    def restore_torch_threads(self) -> None:
        """PyTorch's thread count as it was before the compiled step decoded (it runs PyTorch on one)."""
        threads = self.__dict__.pop("_torch_threads", None)
        if threads is not None:
            torch.set_num_threads(threads)

    def clear_caches(self) -> None:
        for layer in self.layers:
            layer.attn.kv_cache = None
        self.cache_len = 0
        self._release_compiled_step()

    # -- forward ----------------------------------------------------------------------------------------
    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor | None = None,
                logits_at: slice | torch.Tensor | None = None) -> torch.Tensor:
        seqlen = tokens.shape[1]
        if input_pos is None:
            input_pos = torch.arange(seqlen, device=tokens.device)
        if self.cache_len:
            kv_len = int(input_pos[-1]) + 1
            if kv_len > self.cache_len:
                raise GenerationError(f"position {kv_len - 1} is beyond the KV cache of {self.cache_len} "
                                      "tokens; set up a larger cache")
        else:
            if int(input_pos[0]) != 0:
                raise GenerationError("without a KV cache the tokens must start at position 0")
            kv_len = seqlen

        h = self.tok_embeddings(tokens)
        if self.embed_scale is not None:
            h = h * self.embed_scale
        cos, sin = rope_cos_sin(input_pos, self.inv_freq)
        cos_l, sin_l = rope_cos_sin(input_pos, self.inv_freq_local)
        mask_global = attention_mask(input_pos, kv_len, None)
        mask_local = attention_mask(input_pos, kv_len, self.args.sliding_window)
        for i, layer in enumerate(self.layers):
            if self.args.is_local(i):
                h = layer(h, cos_l, sin_l, mask_local, input_pos, kv_len)
            else:
                h = layer(h, cos, sin, mask_global, input_pos, kv_len)
        if logits_at is not None:
            h = h[:, logits_at]
        return self.logits(self.norm(h))

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        if self.output is not None:
            out = self.output(h)
        elif hasattr(self.tok_embeddings, "project"):  # quantized: no float copy of the output matrix
            out = self.tok_embeddings.project(h)
        else:
            out = F.linear(h, self.tok_embeddings.weight)
        if self.final_softcap:
            out = torch.tanh(out / self.final_softcap) * self.final_softcap
        return out

    @property
    def device(self) -> torch.device:
        return self.inv_freq.device

    @property
    def n_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
