"""Lazy safetensors reading and streaming writing, with bf16 and FP8 handled in plain numpy.

A safetensors file is an 8-byte little-endian header length, a JSON header mapping each
tensor name to {dtype, shape, data_offsets}, then the raw little-endian data. numpy has
no bfloat16, so bf16 is read as uint16 and widened to float32 by a 16-bit shift; nor FP8,
read as uint8 codes and decoded by table (quant.fp8; their block scales are the converter's
business, since they live in other tensors).

Reads map only the byte range they need (np.memmap over that range) and drop the map
before returning, so reading a 100 GB checkpoint tensor by tensor keeps RSS at the size
of one tensor, or of one expert slice of a fused [E, ...] tensor. The converter reads
`read_range`: a run of elements with pread into a fresh buffer, which releases the GIL (a
reader thread overlaps it with quantization) and costs no page faults on a mapping. Headers and the index are
input from anywhere: safetensors_header and safetensors_index check them before any read.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

import numpy as np

from quant import fp8
from convert.safetensors_header import TensorEntry, parse
from convert.safetensors_index import read_index
from runtime.base.errors import StepstreamError

# safetensors dtype -> (numpy storage dtype, bytes per element)
_STORAGE = {
    "F32": (np.dtype("<f4"), 4),
    "F16": (np.dtype("<f2"), 2),
    "BF16": (np.dtype("<u2"), 2),
    "F64": (np.dtype("<f8"), 8),  # cast to float32 as read, as transformers and llama.cpp's converter cast it
    "F8_E4M3": (np.dtype("u1"), 1),  # codes; an FP8 checkpoint's weights, scaled by their *_scale_inv tensors
    "F8_E5M2": (np.dtype("u1"), 1),
}
SUPPORTED_DTYPES = tuple(_STORAGE)


def bf16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def to_f32(raw: np.ndarray, dtype: str) -> np.ndarray:
    """Stored elements (read_raw's) as float32: bf16 widened, FP8 codes decoded (unscaled)."""
    if dtype == "BF16":
        return bf16_bits_to_f32(raw)
    if dtype in fp8.DTYPES:
        return fp8.table(dtype)[raw]
    return raw.astype(np.float32)


def f32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """Round-to-nearest-even, NaN kept quiet: the rounding torch and gguf-py use."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = ((u + (0x7FFF + ((u >> 16) & 1))) >> 16).astype(np.uint16)
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    if nan.any():
        rounded[nan] = ((u[nan] >> 16) | 0x40).astype(np.uint16)
    return rounded


class SafetensorsFile:
    """One .safetensors shard, opened lazily: only its header is read up front."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.entries: dict[str, TensorEntry] = parse(self.path)

    def _storage(self, entry: TensorEntry) -> tuple[np.dtype, int]:
        if entry.dtype not in _STORAGE:
            raise StepstreamError(
                f"{self.path}: tensor {entry.name!r} has dtype {entry.dtype}; supported dtypes are {', '.join(SUPPORTED_DTYPES)}"
            )
        return _STORAGE[entry.dtype]  # the header check made nbytes = width * prod(shape)

    def read_range(self, name: str, start: int, count: int) -> np.ndarray:
        """Elements start..start+count of the tensor (flat, row-major) as float32 [count]."""
        return to_f32(self.read_raw(name, start, count), self.entries[name].dtype)

    def read_raw(self, name: str, start: int, count: int) -> np.ndarray:
        """Elements start..start+count as stored: float32, float16, float64, bf16 bits as uint16, or
        FP8 codes as uint8."""
        entry = self.entries[name]
        storage, width = self._storage(entry)
        n = math.prod(entry.shape)
        if not (0 <= start and 0 <= count and start + count <= n):
            raise IndexError(f"{name}: elements {start}..{start + count} outside its {n}")
        raw = np.empty(count, storage)
        view = memoryview(raw).cast("B")
        begin = entry.begin + start * width
        done = 0
        try:
            with open(self.path, "rb", buffering=0) as f:
                while done < len(view):
                    got = os.preadv(f.fileno(), [view[done:]], begin + done)
                    if got <= 0:
                        break
                    done += got
        except OSError as e:
            raise StepstreamError(f"{self.path}: tensor {name!r}: cannot read bytes {begin}..{begin + count * width} ({e.strerror})") from None
        if done != len(view):  # the file shrank since its header was checked
            raise StepstreamError(f"{self.path}: tensor {name!r}: bytes {begin}..{begin + count * width} are past the end of the file")
        return raw

    def read(self, name: str, index: int | None = None) -> np.ndarray:
        """The tensor as float32; with `index`, only slice `index` of its first axis."""
        entry = self.entries[name]
        storage, width = self._storage(entry)
        shape = entry.shape
        begin = entry.begin
        if index is not None:
            if not shape or not 0 <= index < shape[0]:
                raise IndexError(f"{name}: slice {index} outside first axis of shape {list(shape)}")
            inner = shape[1:]
            stride = width * int(np.prod(inner, dtype=np.int64))
            begin += index * stride
            shape = inner
        count = int(np.prod(shape, dtype=np.int64))
        if count == 0:
            return np.zeros(shape, dtype=np.float32)
        try:
            raw = np.memmap(self.path, dtype=storage, mode="r", offset=begin, shape=(count,))
        except (OSError, ValueError) as e:  # the file changed since its header was checked
            raise StepstreamError(f"{self.path}: tensor {name!r}: cannot map bytes {begin}..{begin + count * width} ({e})") from None
        try:
            out = to_f32(raw, entry.dtype)
        finally:
            del raw  # unmap now: the pages leave this process's RSS
        return out.reshape(shape)


class Checkpoint:
    """A Hugging Face checkpoint directory: the index (or a single file) and its shards."""

    INDEX = "model.safetensors.index.json"

    def __init__(self, directory: str | os.PathLike):
        self.dir = Path(directory)
        index_path = self.dir / self.INDEX
        if index_path.exists():
            weight_map = read_index(index_path)
        elif (self.dir / "model.safetensors").exists():
            weight_map = {n: "model.safetensors" for n in SafetensorsFile(self.dir / "model.safetensors").entries}
        else:
            raise StepstreamError(f"{self.dir}: no {self.INDEX} and no model.safetensors")
        self.shards: dict[str, SafetensorsFile] = {}
        for shard in sorted(set(weight_map.values())):
            path = self.dir / shard
            if not path.exists():
                named = sorted(n for n, s in weight_map.items() if s == shard)
                raise StepstreamError(f"{path}: shard named by {index_path.name} is missing (it should hold {len(named)} tensors, e.g. {named[0]!r})")
            self.shards[shard] = SafetensorsFile(path)
        self.weight_map = weight_map
        for name, shard in weight_map.items():
            if name not in self.shards[shard].entries:
                raise StepstreamError(f"{self.dir / shard}: tensor {name!r} is named by the index but absent from this shard")

    def names(self) -> list[str]:
        return list(self.weight_map)

    def unlisted(self) -> dict[str, Path]:
        """Tensors a shard holds that the index does not name (never read), with their shard."""
        return {name: f.path for shard, f in self.shards.items() for name in f.entries
                if self.weight_map.get(name) != shard}

    def entry(self, name: str) -> TensorEntry:
        return self.shards[self.weight_map[name]].entries[name]

    def file_of(self, name: str) -> Path:
        return self.shards[self.weight_map[name]].path

    def read(self, name: str, index: int | None = None) -> np.ndarray:
        return self.shards[self.weight_map[name]].read(name, index)

    def read_range(self, name: str, start: int, count: int) -> np.ndarray:
        return self.shards[self.weight_map[name]].read_range(name, start, count)

    def read_raw(self, name: str, start: int, count: int) -> np.ndarray:
        return self.shards[self.weight_map[name]].read_raw(name, start, count)


class SafetensorsWriter:
    """Writes one shard with a header declared up front and tensors streamed in order.

    Declare every tensor with `add(name, dtype, shape)`, then call `write(name, array)` in
    the same order. The file is written under a temporary name and renamed on `close()`.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._decl: list[tuple[str, str, tuple[int, ...]]] = []
        self._fh = None
        self._next = 0

    def add(self, name: str, dtype: str, shape: tuple[int, ...]) -> None:
        if self._fh is not None:
            raise RuntimeError("SafetensorsWriter: add() after writing started")
        if dtype not in _STORAGE:
            raise ValueError(f"unsupported dtype {dtype}")
        self._decl.append((name, dtype, tuple(shape)))

    def _open(self) -> None:
        header: dict[str, dict] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, dtype, shape in self._decl:
            n = _STORAGE[dtype][1] * int(np.prod(shape, dtype=np.int64))
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
            offset += n
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        self._tmp = self.path.with_name(self.path.name + ".part")
        self._fh = open(self._tmp, "wb")
        self._fh.write(struct.pack("<Q", len(blob)))
        self._fh.write(blob)

    def write(self, name: str, array: np.ndarray) -> None:
        """Write the next declared tensor whole, or in consecutive chunks along its first axis."""
        if self._fh is None:
            self._open()
            self._rows = 0
        exp_name, dtype, shape = self._decl[self._next]
        if name != exp_name or array.ndim != len(shape) or tuple(array.shape[1:]) != shape[1:]:
            raise RuntimeError(f"SafetensorsWriter: expected {exp_name} {shape}, got {name} {array.shape}")
        if dtype == "BF16":
            data = array if array.dtype == np.uint16 else f32_to_bf16_bits(array)
        elif dtype in fp8.DTYPES:
            if array.dtype != np.uint8:
                raise ValueError(f"SafetensorsWriter: {name} is {dtype}: give its codes as uint8, got {array.dtype}")
            data = array
        else:
            data = np.ascontiguousarray(array, dtype=_STORAGE[dtype][0])
        self._fh.write(np.ascontiguousarray(data).tobytes())
        self._rows += array.shape[0] if shape else 1
        total = shape[0] if shape else 1
        if self._rows > total:
            raise RuntimeError(f"SafetensorsWriter: {exp_name} got {self._rows} rows, declared {total}")
        if self._rows == total:
            self._next += 1
            self._rows = 0

    def close(self) -> None:
        if self._fh is None:
            self._open()
        if self._next != len(self._decl):
            self._fh.close()
            os.unlink(self._tmp)
            raise RuntimeError(f"SafetensorsWriter: {len(self._decl) - self._next} declared tensors never written")
        self._fh.close()
        os.replace(self._tmp, self.path)
