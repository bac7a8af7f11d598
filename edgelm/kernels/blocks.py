"""The compiled decode step's view of a model: the C structs `ek_decode_layers` reads (csrc/kernels.c), pointing
at every block's weights and static KV cache in place.

Built from plain buffers (numpy arrays, zero-copy views of PyTorch tensors or of a memory-mapped file), so the
PyTorch models' compiled step (runtime/native.py) and the kernels-only runtime (runtime/engine.py) run the
very same code and get the very same numbers. No PyTorch here.
"""

from __future__ import annotations

import ctypes

import numpy as np

from edgelm.kernels import _library, _Matrix
from edgelm.models.args import ACTIVATIONS, ModelArgs, attention_scale

PROJECTIONS = (("attn", "wq"), ("attn", "wk"), ("attn", "wv"), ("attn", "wo"),
               ("ffn", "w_gate"), ("ffn", "w_up"), ("ffn", "w_down"))
ACTIVATION_CODES = {"silu": 0, "gelu_tanh": 1}
NORMS = ("attn_norm", "ffn_norm", "post_attn_norm", "post_ffn_norm", "q_norm", "k_norm")

_P = ctypes.c_void_p


class BlockArgs(ctypes.Structure):
    _fields_ = [("n_layers", ctypes.c_int32), ("dim", ctypes.c_int32), ("n_heads", ctypes.c_int32),
                ("n_kv_heads", ctypes.c_int32), ("head_dim", ctypes.c_int32), ("hidden_dim", ctypes.c_int32),
                ("max_len", ctypes.c_int32), ("activation", ctypes.c_int32), ("rope_neox", ctypes.c_int32),
                ("norm_eps", ctypes.c_float), ("attn_scale", ctypes.c_float)]


class KVQuant(ctypes.Structure):
    """A cache the step converts as it writes and reads: bits 16 (float16 rows, codes only) or 8/4 (codes,
    fp16 scales and uint8 zeros per group)."""
    _fields_ = [("bits", ctypes.c_int32), ("group", ctypes.c_int32), ("codes", _P), ("scales", _P), ("zeros", _P)]


class Layer(ctypes.Structure):
    _fields_ = [*((name, _Matrix) for _, name in PROJECTIONS),
                *((name, _P) for name in NORMS), ("bq", _P), ("bk", _P), ("bv", _P),
                ("rope_cos", _P), ("rope_sin", _P), ("k_cache", _P), ("v_cache", _P),
                ("k_quant", KVQuant), ("v_quant", KVQuant), ("window", ctypes.c_int32)]


def rope_tables(max_len: int, head_dim: int, base: float) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin [max_len, head_dim / 2] float32; angles in float64 (positions up to 32k times small
    frequencies lose digits in float32), as models.base.rope_cos_sin computes them."""
    inv_freq = 1.0 / (base ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    angles = np.arange(max_len, dtype=np.float64)[:, None] * inv_freq[None, :]
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


class LayerStack:
    """Every block of one model with its KV caches, as `ek_decode_layers` wants them; `run` pushes hidden
    states through all of them. Holds a reference to every buffer whose address the structs keep."""

    def __init__(self, args: ModelArgs, max_len: int):
        self.model_args, self.max_len = args, max_len
        self.keep: list[np.ndarray] = []
        self.args = BlockArgs(args.n_layers, args.dim, args.n_heads, args.n_kv_heads, args.head_dim,
                              args.hidden_dim, max_len, ACTIVATION_CODES[ACTIVATIONS[args.arch]],
                              int(args.rope_neox), args.norm_eps, attention_scale(args))
        self._rope = {local: tuple(self._address(t) for t in rope_tables(max_len, args.head_dim, base))
                      for local, base in ((False, args.rope_base), (True, args.rope_base_local or args.rope_base))}
        self.layers = (Layer * args.n_layers)()
        self.lib = _library()

    def _address(self, array: np.ndarray | None) -> int | None:
        if array is None:
            return None
        if array.dtype != np.float32 or not array.flags.c_contiguous:
            array = np.ascontiguousarray(array, dtype=np.float32)
        self.keep.append(array)
        return array.ctypes.data

    def set_layer(self, i: int, matrices: dict[str, _Matrix], norms: dict[str, np.ndarray | None],
                  biases: dict[str, np.ndarray | None]) -> None:
        """Block i's projections (PROJECTIONS names -> plane-layout structs), norm weights (NORMS names; absent
        ones are skipped) and q/k/v biases ("wq", "wk", "wv"; absent or None for none)."""
        layer = self.layers[i]
        for _, name in PROJECTIONS:
            setattr(layer, name, matrices[name])
        for name in NORMS:
            setattr(layer, name, self._address(norms.get(name)))
        layer.bq, layer.bk, layer.bv = (self._address(biases.get(n)) for n in ("wq", "wk", "wv"))
        local = self.model_args.is_local(i)
        layer.rope_cos, layer.rope_sin = self._rope[local]
        layer.window = self.model_args.sliding_window if local else 0

    def set_float_cache(self, i: int, k: np.ndarray, v: np.ndarray) -> None:
        """Block i's cache: float32 or float16 [n_kv_heads, max_len, head_dim] buffers (batch of one)."""
        layer = self.layers[i]
        self.keep += [k, v]
        if k.dtype == np.float32:
            layer.k_cache, layer.v_cache = k.ctypes.data, v.ctypes.data
        else:
            hd = self.model_args.head_dim
            layer.k_quant = KVQuant(16, hd, k.ctypes.data, None, None)
            layer.v_quant = KVQuant(16, hd, v.ctypes.data, None, None)

    def set_quantized_cache(self, i: int, bits: int, group: int, k: tuple[np.ndarray, ...],
                            v: tuple[np.ndarray, ...]) -> None:
        """Block i's 8-/4-bit cache: (codes, fp16 scales, uint8 zeros) for keys and for values."""
        layer = self.layers[i]
        for name, (codes, scales, zeros) in (("k", k), ("v", v)):
            self.keep += [codes, scales, zeros]
            setattr(layer, f"{name}_quant", KVQuant(bits, group, codes.ctypes.data, scales.ctypes.data,
                                                    zeros.ctypes.data))

    def run(self, x: np.ndarray, pos: int) -> None:
        """Hidden states x [T, dim] (float32, C order) of T consecutive tokens from position `pos`, through
        every block, in place."""
        status = self.lib.ek_decode_layers(ctypes.byref(self.args), self.layers, x.ctypes.data, pos, x.shape[0])
        if status:
            raise RuntimeError(f"edgelm decode step failed with status {status} at position {pos}")


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """Rows of x [T, dim] (float32) normalized as the blocks' norms are, by the kernels."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    weight = np.ascontiguousarray(weight, dtype=np.float32)
    out = np.empty_like(x)
    _library().ek_rms_norm(x.ctypes.data, out.ctypes.data, weight.ctypes.data, x.shape[0], x.shape[1], eps)
    return out
