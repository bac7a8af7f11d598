"""GGUF reading: metadata, memory-mapped tensors, dequantization.

Built on the `gguf` package (the reference reader of the llama.cpp project). Everything that can be wrong
with a file is checked here and reported as a ModelFormatError naming the file and the problem, so that
model code can trust what it gets.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgelm.errors import ModelFormatError, UnsupportedTensorType

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)

_REDOWNLOAD_HINT = "the file is truncated or corrupt: copy or pull it again (edgelm pull NAME --force)"


@dataclass(frozen=True)
class TensorInfo:
    """A tensor as stored: `shape` in PyTorch order (rows first), `data` the raw memory-mapped bytes."""

    name: str
    type_name: str  # ggml type name, e.g. "Q4_K", "F32"
    shape: tuple[int, ...]
    n_bytes: int
    data: np.ndarray

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape)) if self.shape else 1


class GGUFFile:
    """An opened GGUF file: metadata parsed eagerly, tensors memory-mapped until dequantized."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        _check_header(self.path)
        self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
        parser = _HeaderParser(self.path, self._mmap)
        self.version, self.metadata, self.tensors = parser.parse()

    # -- metadata -----------------------------------------------------------------------------------------
    @property
    def architecture(self) -> str:
        arch = self.metadata.get("general.architecture")
        if not isinstance(arch, str):
            raise ModelFormatError(f"{self.path}: metadata key 'general.architecture' is missing; "
                                   "the file was not written by a GGUF converter edgelm understands")
        return arch

    def require(self, key: str) -> Any:
        """A metadata value that must be present."""
        try:
            return self.metadata[key]
        except KeyError:
            raise ModelFormatError(f"{self.path}: required metadata key '{key}' is missing; "
                                   "re-convert the model with a current llama.cpp converter") from None

    # -- tensors ------------------------------------------------------------------------------------------
    def has_tensor(self, name: str) -> bool:
        return name in self.tensors

    def release(self, name: str) -> None:
        """Drop a tensor's file pages from memory once it has been converted (they are read from the file
        again if the tensor is used later): loading then never holds the file and the model at once."""
        import mmap

        raw = getattr(self._mmap, "_mmap", None)
        if raw is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        data = self.tensor_info(name).data
        start = data.ctypes.data - self._mmap.ctypes.data
        begin = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE  # whole pages inside the tensor only
        end = (start + data.nbytes) // mmap.PAGESIZE * mmap.PAGESIZE
        if end > begin:
            raw.madvise(mmap.MADV_DONTNEED, begin, end - begin)

    def tensor_info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise ModelFormatError(f"{self.path}: tensor '{name}' is missing; the file does not hold a "
                                   "complete model of its architecture") from None

    def dequantize(self, name: str, expected_shape: tuple[int, ...] | None = None) -> np.ndarray:
        """The tensor as a float32 array in PyTorch order (rows first)."""
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize

        info = self.tensor_info(name)
        if expected_shape is not None and tuple(expected_shape) != info.shape:
            raise ModelFormatError(f"{self.path}: tensor '{name}' has shape {list(info.shape)}, the "
                                   f"metadata implies {list(expected_shape)}; the file is inconsistent")
        try:
            values = dequantize(info.data, GGMLQuantizationType[info.type_name])
        except NotImplementedError:
            raise UnsupportedTensorType(
                f"{self.path}: tensor '{name}' uses ggml type {info.type_name}, which edgelm cannot "
                "decode; re-quantize the model to a K-quant or Q8_0/Q4_0 type") from None
        values = np.asarray(values, dtype=np.float32).reshape(info.shape)
        # F32 tensors come back as views of the read-only memory map; callers get arrays they own.
        return values if values.flags.writeable else values.copy()

    @property
    def tensor_bytes(self) -> int:
        return sum(t.n_bytes for t in self.tensors.values())


class _HeaderParser:
    """Reads the GGUF header (key/values and tensor infos) with bounds checks on every read."""

    def __init__(self, path: Path, buf: np.ndarray):
        self.path = path
        self.buf = memoryview(buf)
        self.size = len(buf)
        self.pos = 0
        self.key = "<header>"  # what is being read, for error messages

    def fail(self, what: str) -> ModelFormatError:
        return ModelFormatError(f"{self.path}: {what} (while reading {self.key} at byte {self.pos}); "
                                f"{_REDOWNLOAD_HINT}")

    def take(self, n: int) -> memoryview:
        if n < 0 or self.pos + n > self.size:
            raise self.fail(f"unexpected end of file: needed {n} bytes, {self.size - self.pos} left")
        view = self.buf[self.pos:self.pos + n]
        self.pos += n
        return view

    def scalar(self, fmt: str) -> Any:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        n = self.scalar("<Q")
        return bytes(self.take(n)).decode("utf-8", errors="surrogateescape")

    def value(self, vtype: int) -> Any:
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            item_type = self.scalar("<I")
            count = self.scalar("<Q")
            if count > self.size:
                raise self.fail(f"array length {count} exceeds the file size")
            if item_type == _STRING:
                return self.string_array(count)
            if item_type in _SCALAR_FORMATS:
                fmt = _SCALAR_FORMATS[item_type]
                width = struct.calcsize(fmt)
                raw = self.take(width * count)
                dtype = np.dtype(fmt)
                values = np.frombuffer(raw, dtype=dtype, count=count)
                return [bool(v) for v in values] if item_type == _BOOL else values.tolist()
            if item_type == _ARRAY:
                return [self.value(_ARRAY) for _ in range(count)]
            raise self.fail(f"unknown array item type {item_type}")
        if vtype in _SCALAR_FORMATS:
            v = self.scalar(_SCALAR_FORMATS[vtype])
            return bool(v) if vtype == _BOOL else v
        raise self.fail(f"unknown value type {vtype}")

    def string_array(self, count: int) -> list[str]:
        # Hot path: vocabularies hold 100k-260k strings.
        out = []
        buf, size, pos = self.buf, self.size, self.pos
        unpack = struct.Struct("<Q").unpack_from
        for _ in range(count):
            if pos + 8 > size:
                self.pos = pos
                raise self.fail("unexpected end of file inside a string array")
            n = unpack(buf, pos)[0]
            pos += 8
            if pos + n > size:
                self.pos = pos
                raise self.fail(f"string of {n} bytes runs past the end of the file")
            out.append(bytes(buf[pos:pos + n]).decode("utf-8", errors="surrogateescape"))
            pos += n
        self.pos = pos
        return out

    def parse(self) -> tuple[int, dict[str, Any], dict[str, TensorInfo]]:
        from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

        self.take(4)  # magic, checked by _check_header
        version = self.scalar("<I")
        n_tensors = self.scalar("<Q")
        n_kv = self.scalar("<Q")
        if n_tensors > self.size or n_kv > self.size:
            raise self.fail(f"header claims {n_tensors} tensors and {n_kv} keys, more than the file can hold")
        metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            self.key = "a metadata key"
            key = self.string()
            self.key = f"metadata '{key}'"
            vtype = self.scalar("<I")
            metadata[key] = self.value(vtype)

        raw_infos = []
        for _ in range(n_tensors):
            self.key = "a tensor name"
            name = self.string()
            self.key = f"tensor info '{name}'"
            n_dims = self.scalar("<I")
            if not 1 <= n_dims <= 4:
                raise self.fail(f"tensor '{name}' has {n_dims} dimensions (1 to 4 allowed)")
            dims = [self.scalar("<Q") for _ in range(n_dims)]
            type_id = self.scalar("<I")
            offset = self.scalar("<Q")
            raw_infos.append((name, dims, type_id, offset))

        alignment = metadata.get("general.alignment", 32)
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise ModelFormatError(f"{self.path}: general.alignment={alignment!r} is not a power of two")
        data_start = -(-self.pos // alignment) * alignment

        tensors: dict[str, TensorInfo] = {}
        for name, dims, type_id, offset in raw_infos:
            try:
                qtype = GGMLQuantizationType(type_id)
            except ValueError:
                raise UnsupportedTensorType(f"{self.path}: tensor '{name}' has unknown ggml type id "
                                            f"{type_id}; update edgelm or re-quantize the model") from None
            block, type_size = GGML_QUANT_SIZES[qtype]
            if dims[0] % block:
                raise ModelFormatError(f"{self.path}: tensor '{name}' row length {dims[0]} is not a multiple "
                                       f"of the {qtype.name} block size {block}")
            n_rows = int(np.prod(dims[1:])) if len(dims) > 1 else 1
            row_bytes = dims[0] // block * type_size
            n_bytes = n_rows * row_bytes
            start = data_start + offset
            if offset % alignment:
                raise ModelFormatError(f"{self.path}: tensor '{name}' offset {offset} is not aligned to "
                                       f"{alignment}; {_REDOWNLOAD_HINT}")
            if start + n_bytes > self.size:
                raise ModelFormatError(
                    f"{self.path}: tensor '{name}' spans bytes {start}..{start + n_bytes} but the file has "
                    f"{self.size} bytes; {_REDOWNLOAD_HINT}")
            if name in tensors:
                raise ModelFormatError(f"{self.path}: tensor '{name}' appears twice")
            data = np.frombuffer(self.buf, dtype=np.uint8, count=n_bytes, offset=start)
            shape = tuple(int(d) for d in reversed(dims))  # GGUF lists the fastest dimension first
            tensors[name] = TensorInfo(name, qtype.name, shape, n_bytes,
                                       data.reshape(*shape[:-1], row_bytes) if len(shape) > 1 else data)
        return version, metadata, tensors


_STRING, _ARRAY, _BOOL = 8, 9, 7
_SCALAR_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
                   10: "<Q", 11: "<q", 12: "<d"}


def _check_header(path: Path) -> None:
    if not path.exists():
        raise ModelFormatError(f"{path}: no such file")
    if path.is_dir():
        raise ModelFormatError(f"{path}: is a directory, expected a .gguf file")
    with open(path, "rb") as f:
        head = f.read(24)
    if len(head) < 24:
        raise ModelFormatError(f"{path}: only {len(head)} bytes, too short for a GGUF header; {_REDOWNLOAD_HINT}")
    if head[:4] != GGUF_MAGIC:
        raise ModelFormatError(f"{path}: bad magic {head[:4]!r} (expected b'GGUF'); this is not a GGUF file")
    version = struct.unpack("<I", head[4:8])[0]
    if version not in SUPPORTED_VERSIONS:
        raise ModelFormatError(f"{path}: GGUF version {version} is not supported (supported: "
                               f"{', '.join(map(str, SUPPORTED_VERSIONS))}); convert it with a current llama.cpp")
