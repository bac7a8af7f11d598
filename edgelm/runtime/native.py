"""The compiled decode step: one call into edgelm's kernels runs a token through every block.

Eager PyTorch spends more time dispatching the ~40 small operations of each block than the fused
low-bit matrix-vector products take; `ek_decode_layers` (edgelm/kernels/csrc/kernels.c) does the norms,
rotary embeddings, the KV-cache write, attention and the gated feed-forward in C and the projections on
the kernels, reading the model's own weights and static KV cache in place (no copies). Python is left
with the embedding row, the final norm, the output matrix (also on the kernels) and sampling.

A model runs here when every projection of every block is a quantized layer the kernels support and its
KV cache is float32, float16 or quantized to 8/4 bits (`--kv-bits`: the step writes and reads the same
values as the eager path); anything else (float or low-rank layers, a batch) decodes on the eager path, with the
same results up to the int8 activations of the kernels.
"""

from __future__ import annotations

import ctypes

import torch

from edgelm import kernels
from edgelm.compress.quant.modules import KERNEL_MAX_TOKENS
from edgelm.kernels import _library, _Matrix
from edgelm.models.base import KVCache, Transformer, rope_cos_sin

PROJECTIONS = (("attn", "wq"), ("attn", "wk"), ("attn", "wv"), ("attn", "wo"),
               ("ffn", "w_gate"), ("ffn", "w_up"), ("ffn", "w_down"))
ACTIVATIONS = {"silu": 0, "gelu_tanh": 1}


class _BlockArgs(ctypes.Structure):
    _fields_ = [("n_layers", ctypes.c_int32), ("dim", ctypes.c_int32), ("n_heads", ctypes.c_int32),
                ("n_kv_heads", ctypes.c_int32), ("head_dim", ctypes.c_int32), ("hidden_dim", ctypes.c_int32),
                ("max_len", ctypes.c_int32), ("activation", ctypes.c_int32), ("rope_neox", ctypes.c_int32),
                ("norm_eps", ctypes.c_float), ("attn_scale", ctypes.c_float)]


_P = ctypes.c_void_p


class _KVQuant(ctypes.Structure):
    _fields_ = [("bits", ctypes.c_int32), ("group", ctypes.c_int32), ("codes", _P), ("scales", _P), ("zeros", _P)]


class _Layer(ctypes.Structure):
    _fields_ = [*((name, _Matrix) for _, name in PROJECTIONS),
                ("attn_norm", _P), ("ffn_norm", _P), ("post_attn_norm", _P), ("post_ffn_norm", _P),
                ("q_norm", _P), ("k_norm", _P), ("bq", _P), ("bk", _P), ("bv", _P),
                ("rope_cos", _P), ("rope_sin", _P), ("k_cache", _P), ("v_cache", _P),
                ("k_quant", _KVQuant), ("v_quant", _KVQuant), ("window", ctypes.c_int32)]


class NativeDecoder:
    """Decode steps of one model with its current KV caches (rebuilt when the caches are replaced)."""

    def __init__(self, model: Transformer):
        self.model = model
        args = model.args
        first = model.layers[0]
        self.keep: list[torch.Tensor] = []  # every tensor whose address the C structs hold
        self.args = _BlockArgs(args.n_layers, args.dim, args.n_heads, args.n_kv_heads, args.head_dim,
                               args.hidden_dim, model.cache_len, ACTIVATIONS[_activation(first.ffn)],
                               int(args.rope_neox), args.norm_eps, first.attn.scale)
        positions = torch.arange(model.cache_len)
        tables = {}
        for key, inv_freq in (("global", model.inv_freq), ("local", model.inv_freq_local)):
            cos, sin = rope_cos_sin(positions, inv_freq)
            tables[key] = (self._ptr(cos), self._ptr(sin))
        layers = (_Layer * args.n_layers)()
        for i, block in enumerate(model.layers):
            layer = layers[i]
            for owner, name in PROJECTIONS:
                km = getattr(getattr(block, owner), name).weight_q.kernel()
                setattr(layer, name, km._struct)
            layer.attn_norm, layer.ffn_norm = self._ptr(block.attn_norm.weight), self._ptr(block.ffn_norm.weight)
            layer.post_attn_norm = self._ptr(getattr(block, "post_attn_norm", None))
            layer.post_ffn_norm = self._ptr(getattr(block, "post_ffn_norm", None))
            attn = block.attn
            layer.q_norm, layer.k_norm = self._ptr(attn.q_norm), self._ptr(attn.k_norm)
            layer.bq, layer.bk, layer.bv = (self._ptr(getattr(attn, n).bias) for n in ("wq", "wk", "wv"))
            local = args.is_local(i)
            layer.rope_cos, layer.rope_sin = tables["local" if local else "global"]
            cache = attn.kv_cache
            if type(cache) is KVCache and cache.k.dtype == torch.float32:
                layer.k_cache, layer.v_cache = cache.k.data_ptr(), cache.v.data_ptr()
            elif type(cache) is KVCache:  # float16: the step converts each row it writes and reads
                layer.k_quant = _KVQuant(16, args.head_dim, cache.k.data_ptr(), None, None)
                layer.v_quant = _KVQuant(16, args.head_dim, cache.v.data_ptr(), None, None)
            else:  # quantized: the same codes, scales and zeros the eager path reads and writes
                for name in ("k", "v"):
                    setattr(layer, f"{name}_quant", _KVQuant(
                        cache.scheme.bits, cache.scheme.group_size, getattr(cache, f"{name}_codes").data_ptr(),
                        getattr(cache, f"{name}_scales").data_ptr(), getattr(cache, f"{name}_zeros").data_ptr()))
            layer.window = args.sliding_window if local else 0
        self.layers = layers
        self.lib = _library()

    def _ptr(self, tensor_or_module) -> int | None:
        if tensor_or_module is None:
            return None
        tensor = getattr(tensor_or_module, "weight", tensor_or_module)
        if tensor is None:
            return None
        tensor = tensor.detach().to(torch.float32).contiguous()
        self.keep.append(tensor)
        return tensor.data_ptr()

    @torch.inference_mode()
    def step(self, token: int, pos: int) -> torch.Tensor:
        """Next-token logits [vocab] after `token` at position `pos`."""
        return self.steps([token], pos)[0]

    @torch.inference_mode()
    def steps(self, tokens: list[int], pos: int) -> torch.Tensor:
        """Logits [T, vocab] after each of T consecutive tokens starting at position `pos` (speculative
        verification). Every token's result is bit-identical to decoding it alone with `step`."""
        model = self.model
        single_threaded_torch(model)
        x = model.tok_embeddings(torch.tensor([tokens]))[0].to(torch.float32).contiguous()
        if model.embed_scale is not None:
            x.mul_(model.embed_scale)
        status = self.lib.ek_decode_layers(ctypes.byref(self.args), self.layers, x.data_ptr(), pos, len(tokens))
        if status:
            raise RuntimeError(f"edgelm decode step failed with status {status} at position {pos}")
        normed = torch.stack([model.norm(row[None, None])[0, 0] for row in x])  # row by row, as `step` does
        # The output matrix on the kernels too (a few rows at a time), so each row matches `step`'s.
        return torch.cat([model.logits(part[None])[0] for part in normed.split(KERNEL_MAX_TOKENS)])


def single_threaded_torch(model: Transformer) -> None:
    """PyTorch on one thread while the compiled step decodes: its OpenMP threads spin after every parallel
    operation (the sampler's argmax over the vocabulary is one) and take the cores from the kernels' own
    threads (gemma-3-270m: 52 -> 97 tok/s). `Transformer.restore_torch_threads` (prefill, new caches)
    undoes it."""
    if "_torch_threads" not in model.__dict__:
        model.__dict__["_torch_threads"] = torch.get_num_threads()
        torch.set_num_threads(1)


def native_decoder(model: Transformer) -> NativeDecoder | None:
    """The model's compiled decode step for its current caches, or None when it must decode eagerly."""
    if not model.cache_len or not kernels.available():
        return None
    if "_native_decoder" not in model.__dict__:  # built once per setup_caches (clear_caches drops it)
        model.__dict__["_native_decoder"] = NativeDecoder(model) if _eligible(model) else None
    return model.__dict__["_native_decoder"]


def _eligible(model: Transformer) -> bool:
    from edgelm.compress.quant.modules import QuantizedLinear

    for block in model.layers:
        attn = getattr(block, "attn", None)
        if not _cache_supported(getattr(attn, "kv_cache", None), model.args.head_dim):
            return False
        if not hasattr(block, "attn_norm") or not hasattr(block, "ffn_norm") or _activation(block.ffn) is None:
            return False
        for owner, name in PROJECTIONS:
            layer = getattr(getattr(block, owner), name)
            if type(layer) is not QuantizedLinear or layer.weight_q.kernel() is None:
                return False
        if type(block).forward is not _standard_forward(block):
            return False
    return True


def _cache_supported(cache, head_dim: int) -> bool:
    """A float32 or float16 cache, or an 8-/4-bit quantized one (asymmetric groups that divide the head)."""
    from edgelm.runtime.kv_cache import QuantizedKVCache

    if type(cache) is KVCache:
        return cache.k.dtype in (torch.float32, torch.float16) and cache.k.shape[0] == 1
    if type(cache) is QuantizedKVCache:
        scheme = cache.scheme
        group = scheme.group_size or head_dim
        return (cache.k_codes.shape[0] == 1 and scheme.bits in (4, 8) and not scheme.symmetric
                and head_dim % group == 0 and group % 2 == 0)
    return False


def _activation(ffn) -> str | None:
    name = getattr(ffn, "activation", None)
    return name if name in ACTIVATIONS else None


def _standard_forward(block):
    """The block classes whose computation ek_decode_layers reproduces."""
    from edgelm.models import gemma3, llama

    return {gemma3.Block: gemma3.Block.forward, llama.Block: llama.Block.forward}.get(type(block))
