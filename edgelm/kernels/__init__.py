"""edgelm's compiled CPU kernels (fused dequantize-and-dot over packed low-bit weights), through ctypes.

The shared object is built by the package's install (setup.py) with the machine's C compiler and picks
its SIMD path at run time (AVX-512 VNNI, else AVX2 with FMA and F16C, else portable C). When it was not
built, `available()` is False and the model runs on its PyTorch path; nothing else changes.
EDGELM_KERNELS=0 turns the kernels off, EDGELM_KERNELS_GENERIC=1 keeps them on the portable path.

    from edgelm.kernels import KernelMatrix, available
    km = KernelMatrix.from_packed(packed_weight)   # shares its buffers (plane layout)
    y = km.matvec(x)                               # x [T, cols] float32 -> [T, rows]
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np

from edgelm.kernels.layout import CHUNK

if TYPE_CHECKING:
    import torch

LEVELS = {0: "generic C", 1: "AVX2", 2: "AVX-512 VNNI"}


class _Matrix(ctypes.Structure):
    _fields_ = [("rows", ctypes.c_int32), ("cols", ctypes.c_int32), ("bits", ctypes.c_int32),
                ("group", ctypes.c_int32), ("q", ctypes.c_void_p), ("scales", ctypes.c_void_p),
                ("zeros", ctypes.c_void_p), ("zeros_f16", ctypes.c_void_p)]


@lru_cache(maxsize=1)
def _library() -> ctypes.CDLL | None:
    if os.environ.get("EDGELM_KERNELS", "1") == "0":
        return None
    spec = importlib.util.find_spec("edgelm.kernels._native")
    if spec is None or not spec.origin:
        return None
    lib = ctypes.CDLL(spec.origin)
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.ek_matvec.argtypes = [ctypes.POINTER(_Matrix), i64, p, p, p, p, i64, p]
    lib.ek_matvec.restype = ctypes.c_int
    lib.ek_kv_quantize.argtypes = [p, i64, ctypes.c_int32, ctypes.c_int32, p, p, p]
    lib.ek_kv_quantize.restype = None
    lib.ek_matvec_parts.argtypes = [p, p, ctypes.c_int, i64, p, p, p, p, i64]
    lib.ek_matvec_parts.restype = ctypes.c_int
    lib.ek_quantize_act.argtypes = [p, i64, p, p, p]
    lib.ek_quantize_act.restype = None
    lib.ek_set_threads.argtypes = [ctypes.c_int]
    lib.ek_set_threads.restype = ctypes.c_int
    lib.ek_get_threads.restype = ctypes.c_int
    lib.ek_decode_layers.argtypes = [p, p, p, i64, i64]
    lib.ek_decode_layers.restype = ctypes.c_int
    lib.ek_cpu_level.restype = ctypes.c_int
    lib.ek_dequantize.argtypes = [ctypes.POINTER(_Matrix), i64, i64, p, i64, ctypes.c_int, ctypes.c_int]
    lib.ek_dequantize.restype = ctypes.c_int
    lib.ek_cpu_has_bf16.restype = ctypes.c_int
    lib.ek_limit_cpu_level.argtypes = [ctypes.c_int]
    lib.ek_limit_cpu_level.restype = ctypes.c_int
    lib.ek_limit_cpu_level(_allowed_level())
    lib.ek_rms_norm.argtypes = [p, p, p, i64, i64, ctypes.c_float]
    lib.ek_rms_norm.restype = None
    lib.ek_set_threads(default_threads())
    return lib


def usable_cpus() -> int:
    """The CPUs this process may run on (all cores unless restricted by affinity or a container)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def default_threads() -> int:
    """PyTorch's thread count when it is loaded (the kernels share its cores), else the usable CPUs."""
    if "torch" in sys.modules:
        return sys.modules["torch"].get_num_threads()
    return usable_cpus()


def matrix_struct(rows: int, cols: int, bits: int, group: int, planes: int, scales: int, zeros: int,
                  float_zeros: bool) -> _Matrix:
    """The C view of a weight in the plane layout: codes, fp16 scales and uint8 (or fp16) zero points given
    by address; whoever builds it keeps the buffers alive."""
    return _Matrix(rows, cols, bits, group, planes, scales, None if float_zeros else zeros,
                   zeros if float_zeros else None)


def available() -> bool:
    return _library() is not None


def cpu_path() -> str:
    """Which SIMD path the kernels use on this CPU ("unavailable" when they were not built)."""
    lib = _library()
    return "unavailable" if lib is None else LEVELS.get(lib.ek_cpu_level(), "generic C")


def _allowed_level() -> int:
    """The highest path the kernels may take: the CPU's best (99 is clamped to it), or the portable one
    under EDGELM_KERNELS_GENERIC=1."""
    return 0 if os.environ.get("EDGELM_KERNELS_GENERIC") == "1" else 99


def simd_paths() -> list[str]:
    """The SIMD paths this CPU can run, best first (each below the best can be asked for with limited_path)."""
    lib = _library()
    if lib is None:
        return []
    best = min(lib.ek_cpu_level(), _allowed_level())
    return [LEVELS[level] for level in sorted(LEVELS, reverse=True) if 0 < level <= best]


@contextmanager
def limited_path(name: str) -> Iterator[None]:
    """Run the kernels on the named path ("generic C", "AVX2", ...) or the best below it inside the block
    (to compare paths on one CPU)."""
    lib = _library()
    level = next(level for level, label in LEVELS.items() if label == name)
    lib.ek_limit_cpu_level(level)
    try:
        yield
    finally:
        lib.ek_limit_cpu_level(_allowed_level())


def generic_path():
    """Run the kernels on their portable C path inside the block (to compare it with the SIMD one)."""
    return limited_path("generic C")


def batched_dtype() -> torch.dtype:
    """The dtype batched (prefill) matmuls dequantize to: bfloat16 where the CPU multiplies it natively
    (AVX-512 BF16 / AMX: several times float32's rate), else float32."""
    import torch

    lib = _library()
    return torch.bfloat16 if lib is not None and lib.ek_cpu_has_bf16() else torch.float32


def set_threads(n: int) -> int:
    """Threads the kernels split a matrix across (the calling thread included); returns the number in effect."""
    lib = _library()
    return 1 if lib is None else lib.ek_set_threads(n)


def threads() -> int:
    lib = _library()
    return 1 if lib is None else lib.ek_get_threads()


def supports(bits: int, group_size: int | None, in_features: int, zero_dtype: str = "uint8") -> bool:
    """Whether a packed weight of this format (zero points "uint8" or "float16") can run on the kernels."""
    group = group_size or in_features
    # Symmetric grids keep their fixed zero point in the zeros buffer, so they run as they are; fp16 zero
    # points (ggml Q4_K's mins) take a float zero-point term; groups of 16 (ggml Q6_K) need integer ones.
    grouping = group % 32 == 0 or (group == 16 and zero_dtype == "uint8")
    return (available() and in_features % CHUNK == 0 and grouping and in_features % group == 0
            and 1 <= bits <= 8 and zero_dtype in ("uint8", "float16"))


# The classes below take PyTorch tensors (the PyTorch models) or numpy arrays (the kernels-only runtime,
# edgelm/runtime/engine.py) alike: the kernels only need addresses; what they allocate follows their input.

def _is_torch(buffer) -> bool:
    return hasattr(buffer, "data_ptr")


def _address(buffer) -> int:
    return buffer.data_ptr() if _is_torch(buffer) else buffer.ctypes.data


def dtype_name(buffer_or_dtype) -> str:
    """"uint8", "float16", ...: the element type of a tensor or array (or a torch/numpy dtype) by name."""
    dtype = getattr(buffer_or_dtype, "dtype", buffer_or_dtype)
    return str(dtype).removeprefix("torch.")


def _contiguous(buffer, dtype: str | None = None):
    if _is_torch(buffer):
        import torch

        return (buffer.detach() if dtype is None else buffer.detach().to(getattr(torch, dtype))).contiguous()
    return np.ascontiguousarray(buffer, dtype=dtype)


def _empty(like, shape: tuple[int, ...], dtype: str = "float32"):
    """An uninitialized tensor (when `like` is one) or numpy array."""
    if _is_torch(like):
        import torch

        return torch.empty(shape, dtype=getattr(torch, dtype))
    return np.empty(shape, dtype=dtype)


def _row_stride(buffer) -> tuple[int, int]:
    """Strides of a 2-D tensor or array, in elements."""
    if _is_torch(buffer):
        return buffer.stride(0), buffer.stride(1)
    return buffer.strides[0] // buffer.itemsize, buffer.strides[1] // buffer.itemsize


class QuantizedActivations:
    """x [T, cols] float32 quantized to int8 in blocks of 32, ready for any matrix with `cols` columns."""

    def __init__(self, x):
        x = _contiguous(x, "float32")
        self.n_tokens, self.cols = x.shape
        self.xq = _empty(x, (self.n_tokens, self.cols), "int8")
        self.dx = _empty(x, (self.n_tokens, self.cols // 32))
        self.bsum = _empty(x, (self.n_tokens, self.cols // 32))
        _library().ek_quantize_act(_address(x), self.n_tokens * self.cols, _address(self.xq), _address(self.dx),
                                   _address(self.bsum))


class KernelMatrix:
    """A weight in the kernels' plane layout (codes, fp16 scales, uint8 or fp16 zeros), row order preserved."""

    def __init__(self, planes, scales, zeros, bits: int, group: int, cols: int):
        self.planes, self.scales, self.zeros = _contiguous(planes), _contiguous(scales), _contiguous(zeros)
        self.rows, self.cols, self.bits, self.group = planes.shape[0], cols, bits, group
        self._struct = matrix_struct(self.rows, cols, bits, group, _address(self.planes), _address(self.scales),
                                     _address(self.zeros), float_zeros=dtype_name(self.zeros) != "uint8")

    @classmethod
    def from_packed(cls, weight) -> KernelMatrix:
        """From a PackedWeight (edgelm.compress.quant.modules), sharing its buffers; check `supports` first.
        A weight still in the dense packing is re-stored in the plane layout, in place."""
        import torch

        if not weight.to_plane_layout():
            raise ValueError(f"{weight.in_features} columns are not a multiple of {CHUNK}: no plane layout")
        scheme, cols = weight.scheme, weight.in_features
        zeros = weight.zeros if weight.zeros.dtype == torch.float16 else weight.zeros.to(torch.uint8)
        return cls(weight.packed, weight.scales.to(torch.float16), zeros, scheme.bits, scheme.group_size or cols,
                   cols)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in (self.planes, self.scales, self.zeros))

    def select_rows(self, rows) -> KernelMatrix:
        """A copy of just these rows (an int64 index array), in the same format."""
        if _is_torch(self.planes):
            import torch

            rows = torch.as_tensor(rows, dtype=torch.long)
        return KernelMatrix(self.planes[rows], self.scales[rows], self.zeros[rows], self.bits, self.group, self.cols)

    def dequantize(self, first: int = 0, n: int | None = None, dtype: torch.dtype | None = None,
                   out=None, parallel: bool = True):
        """Rows [first, first + n) as a dense float32 or bfloat16 [n, cols] matrix (a tensor, unless `out` is
        given), on the kernels' threads or (parallel=False) on the calling thread only."""
        n = self.rows - first if n is None else n
        if out is None:
            out = _empty(self.planes, (n, self.cols), dtype_name(dtype) if dtype is not None else "float32")
        kind = dtype_name(out)
        if kind not in ("float32", "bfloat16") or _row_stride(out)[1] != 1 or tuple(out.shape) != (n, self.cols):
            raise ValueError(f"dequantize writes a row-major float32/bfloat16 [{n}, {self.cols}] tensor")
        status = _library().ek_dequantize(ctypes.byref(self._struct), first, n, _address(out), _row_stride(out)[0],
                                          int(kind == "bfloat16"), int(parallel))
        if status:
            raise ValueError(f"cannot dequantize rows {first}..{first + n} of a {self.rows}-row matrix")
        return out

    def matvec(self, x, out=None, out_index=None):
        """x [T, cols] -> [T, rows]; with out_index (int32 [rows]) row r lands in column out_index[r] of out."""
        qa = x if isinstance(x, QuantizedActivations) else QuantizedActivations(x)
        if qa.cols != self.cols:
            raise ValueError(f"activations have {qa.cols} columns, the matrix {self.cols}")
        if out is None:
            out = _empty(qa.xq, (qa.n_tokens, self.rows))
        status = _library().ek_matvec(ctypes.byref(self._struct), qa.n_tokens, _address(qa.xq), _address(qa.dx),
                                      _address(qa.bsum), _address(out), _row_stride(out)[0],
                                      None if out_index is None else _address(out_index))
        if status:
            raise RuntimeError(f"edgelm kernel rejected a {self.rows}x{self.cols} {self.bits}-bit matrix "
                               f"(group {self.group}): status {status}")
        return out


MAX_PARTS = 8


def tier_index(tier: np.ndarray, n_parts: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """For a row-tiered matrix (tier[r]: the part holding row r): local[r], row r's position in its part
    (int64), and each part's rows in ascending order (int32, KernelParts' output indices)."""
    order = np.argsort(tier, kind="stable")
    counts = np.bincount(tier, minlength=n_parts)
    rows = [part.astype(np.int32) for part in np.split(order, np.cumsum(counts)[:-1])]
    local = np.empty(tier.shape[0], dtype=np.int64)
    for part in rows:
        local[part] = np.arange(part.size)
    return local, rows


class KernelParts:
    """Matrices that write disjoint columns of one output (the row tiers of an output matrix), run as one
    parallel job: one hand-off to the threads instead of one per part."""

    def __init__(self, matrices: list[KernelMatrix], out_indices: list):
        if not 1 <= len(matrices) <= MAX_PARTS or len({m.cols for m in matrices}) != 1:
            raise ValueError(f"1..{MAX_PARTS} matrices with the same number of columns")
        self.matrices, self.cols = matrices, matrices[0].cols
        self.out_indices = [_contiguous(index, "int32") for index in out_indices]
        self.width = sum(m.rows for m in matrices)
        n = len(matrices)
        self._structs = (ctypes.c_void_p * n)(*(ctypes.addressof(m._struct) for m in matrices))
        self._indices = (ctypes.c_void_p * n)(*(_address(index) for index in self.out_indices))

    def matvec(self, x, out=None):
        qa = x if isinstance(x, QuantizedActivations) else QuantizedActivations(x)
        if qa.cols != self.cols:
            raise ValueError(f"activations have {qa.cols} columns, the matrices {self.cols}")
        if out is None:
            out = _empty(qa.xq, (qa.n_tokens, self.width))
        status = _library().ek_matvec_parts(self._structs, self._indices, len(self.matrices), qa.n_tokens,
                                            _address(qa.xq), _address(qa.dx), _address(qa.bsum), _address(out),
                                            _row_stride(out)[0])
        if status:
            raise RuntimeError(f"edgelm kernels rejected the parts (status {status})")
        return out
