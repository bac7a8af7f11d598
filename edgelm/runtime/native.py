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

import torch

from edgelm import kernels
from edgelm.compress.quant.modules import KERNEL_MAX_TOKENS
from edgelm.kernels.blocks import NORMS, PROJECTIONS, LayerStack, rms_norm
from edgelm.models.base import KVCache, Transformer


class NativeDecoder:
    """Decode steps of one model with its current KV caches (rebuilt when the caches are replaced)."""

    def __init__(self, model: Transformer):
        self.model = model
        self.stack = LayerStack(model.args, model.cache_len)
        for i, block in enumerate(model.layers):
            attn = block.attn
            owners = {"attn": attn, "ffn": block.ffn}
            matrices = {name: getattr(owners[owner], name).weight_q.kernel()._struct for owner, name in PROJECTIONS}
            norm_owners = {"q_norm": attn, "k_norm": attn}
            norms = {name: _array(getattr(norm_owners.get(name, block), name, None)) for name in NORMS}
            biases = {name: _array(getattr(attn, name).bias) for name in ("wq", "wk", "wv")}
            self.stack.set_layer(i, matrices, norms, biases)
            cache = attn.kv_cache
            if type(cache) is KVCache:  # float32, or float16 the step converts each row it writes and reads
                self.stack.set_float_cache(i, cache.k[0].numpy(), cache.v[0].numpy())
            else:  # quantized: the same codes, scales and zeros the eager path reads and writes
                self.stack.set_quantized_cache(
                    i, cache.scheme.bits, cache.scheme.group_size,
                    *(tuple(getattr(cache, f"{name}_{part}")[0].numpy() for part in ("codes", "scales", "zeros"))
                      for name in ("k", "v")))
        self.final_norm = _array(model.norm)

    @torch.inference_mode()
    def step(self, token: int, pos: int) -> torch.Tensor:
        """Next-token logits [vocab] after `token` at position `pos`."""
        return self.steps([token], pos)[0]

    @torch.inference_mode()
    def steps(self, tokens: list[int], pos: int) -> torch.Tensor:
        """Logits [T, vocab] after each of T consecutive tokens starting at position `pos` (speculative
        verification). Every token's result is bit-identical to decoding it alone with `step`."""
        normed = torch.from_numpy(self.final_hidden(tokens, pos))
        # The output matrix on the kernels too (a few rows at a time), so each row matches `step`'s.
        return torch.cat([self.model.logits(part[None])[0] for part in normed.split(KERNEL_MAX_TOKENS)])

    @torch.inference_mode()
    def final_hidden(self, tokens: list[int], pos: int):
        """The final-normed hidden states [T, dim] (numpy float32) the output matrix turns into logits."""
        model = self.model
        single_threaded_torch(model)
        x = model.tok_embeddings(torch.tensor([tokens]))[0].to(torch.float32).contiguous()
        if model.embed_scale is not None:
            x.mul_(model.embed_scale)
        self.stack.run(x.numpy(), pos)
        return rms_norm(x.numpy(), self.final_norm, model.args.norm_eps)


def _array(tensor_or_module):
    """A float32 numpy view (or copy) of a parameter or of a module's weight; None stays None."""
    tensor = getattr(tensor_or_module, "weight", tensor_or_module)
    if tensor is None:
        return None
    return tensor.detach().to(torch.float32).contiguous().numpy()


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
        if not hasattr(block, "attn_norm") or not hasattr(block, "ffn_norm"):
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


def _standard_forward(block):
    """The block classes whose computation ek_decode_layers reproduces."""
    from edgelm.models import gemma3, llama

    return {gemma3.Block: gemma3.Block.forward, llama.Block: llama.Block.forward}.get(type(block))
