"""A safetensors header, read and checked before any tensor byte is touched.

A shard is an 8-byte little-endian header length N, N bytes of UTF-8 JSON mapping each tensor
name to {dtype, shape, data_offsets: [begin, end]} (offsets relative to the data area that
starts at 8 + N), then the data. A checkpoint is input from anywhere, so everything the header
claims is checked against the file before it is believed: every tensor lies inside the data
area, its byte count is exactly what its dtype and shape need (in Python integers, which do not
overflow), no two tensors share bytes. Nothing larger than the header itself is read or
allocated here, and the header is at most the file's size. Every failure is a StepstreamError
naming the file and, where there is one, the tensor.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from runtime.base.errors import StepstreamError

# Bits per element of every safetensors dtype (the safetensors crate's Dtype).
DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32,
    "I64": 64, "U64": 64, "F64": 64, "C64": 64,
    "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
}
MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str  # safetensors dtype string, e.g. "BF16"
    shape: tuple[int, ...]
    begin: int  # absolute byte offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


class _Duplicate(Exception):
    pass


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    out = {}
    for key, value in pairs:
        if key in out:
            raise _Duplicate(key)
        out[key] = value
    return out


def _kind(value) -> str:
    return {dict: "object", list: "list", str: "string", bool: "boolean", type(None): "null"}.get(type(value), type(value).__name__)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def read_header(path: Path) -> tuple[dict, int, int]:
    """(header JSON object, data area start, file size), the header's framing checked."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 8:
                raise StepstreamError(f"{path}: not a safetensors file ({size} bytes, shorter than the 8-byte header length)")
            (hlen,) = struct.unpack("<Q", f.read(8))
            if hlen == 0 or hlen > size - 8:
                raise StepstreamError(f"{path}: not a safetensors file (header length {hlen} bytes, but the file holds {size})")
            if hlen > MAX_HEADER_BYTES:
                raise StepstreamError(f"{path}: header length {hlen} bytes exceeds the safetensors limit of {MAX_HEADER_BYTES}")
            raw = f.read(hlen)
    except FileNotFoundError:
        raise StepstreamError(f"{path}: shard not found") from None
    except IsADirectoryError:
        raise StepstreamError(f"{path}: is a directory, not a safetensors shard") from None
    except OSError as e:
        raise StepstreamError(f"{path}: cannot read ({e.strerror or e})") from None
    if len(raw) != hlen:
        raise StepstreamError(f"{path}: file shrank while its header was read ({len(raw)} of {hlen} bytes)")
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except _Duplicate as e:
        raise StepstreamError(f"{path}: the header names {e.args[0]!r} twice") from None
    except UnicodeDecodeError as e:
        raise StepstreamError(f"{path}: not a valid safetensors file (header is not UTF-8: {e.reason} at byte {8 + e.start})") from None
    except RecursionError:
        raise StepstreamError(f"{path}: not a valid safetensors file (header JSON nested too deeply)") from None
    except ValueError as e:  # JSONDecodeError, or an integer too long to convert
        raise StepstreamError(f"{path}: not a valid safetensors file (header is not valid JSON: {e})") from None
    if not isinstance(header, dict):
        raise StepstreamError(f"{path}: not a valid safetensors file (header is a JSON {_kind(header)}, not an object)")
    return header, 8 + hlen, size


def _entry(path: Path, name: str, meta, base: int, size: int) -> TensorEntry:
    where = f"{path}: tensor {name!r}"
    if not isinstance(meta, dict):
        raise StepstreamError(f"{where}: header entry is a JSON {_kind(meta)}, not an object")
    for key in ("dtype", "shape", "data_offsets"):
        if key not in meta:
            raise StepstreamError(f"{where} has no {key!r} in the header")
    dtype, shape, offsets = meta["dtype"], meta["shape"], meta["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
        raise StepstreamError(f"{where} has unknown dtype {dtype!r}; safetensors dtypes are {', '.join(DTYPE_BITS)}")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise StepstreamError(f"{where} has shape {shape!r}; a shape is a list of non-negative integers")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets):
        raise StepstreamError(f"{where} has data_offsets {offsets!r}; they must be two integers [begin, end]")
    b, e = offsets
    if b < 0 or e < 0:
        raise StepstreamError(f"{where} has negative data_offsets {offsets}: it would be read from the header, before the data area")
    if e < b:
        raise StepstreamError(f"{where} has data_offsets {offsets} that end before they begin")
    if base + e > size:
        raise StepstreamError(f"{where} ends at byte {base + e}, past the end of the file ({size} bytes); the shard is truncated")
    bits = DTYPE_BITS[dtype] * math.prod(shape)
    if bits % 8 or bits // 8 != e - b:
        need = f"{bits // 8}" if bits % 8 == 0 else f"{bits} bits, not a whole number of bytes"
        raise StepstreamError(f"{where} holds {e - b} bytes but shape {shape} of {dtype} needs {need}")
    return TensorEntry(name, dtype, tuple(shape), base + b, base + e)


def _check_overlaps(path: Path, entries: list[TensorEntry]) -> None:
    spans = sorted((e for e in entries if e.nbytes), key=lambda e: (e.begin, e.end))
    for prev, cur in zip(spans, spans[1:]):
        if cur.begin < prev.end:
            raise StepstreamError(f"{path}: tensors {prev.name!r} (bytes {prev.begin}..{prev.end}) and "
                                  f"{cur.name!r} (bytes {cur.begin}..{cur.end}) overlap")


def parse(path: str | os.PathLike) -> dict[str, TensorEntry]:
    """Every tensor of one shard, by name, each one checked against the file."""
    path = Path(path)
    header, base, size = read_header(path)
    meta = header.get("__metadata__")
    if meta is not None and not isinstance(meta, dict):
        raise StepstreamError(f"{path}: __metadata__ is a JSON {_kind(meta)}, not an object")
    entries = {name: _entry(path, name, m, base, size) for name, m in header.items() if name != "__metadata__"}
    _check_overlaps(path, list(entries.values()))
    return entries
