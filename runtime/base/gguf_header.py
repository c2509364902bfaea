"""A GGUF file's header, read with every count, length and offset checked against the file.

gguf-py's GGUFReader trusts what it reads: an array that claims 2^60 elements loops until
memory runs out, a count past the end raises a bare IndexError, and every array element
becomes a numpy object (a one-megabyte byte array costs ~100 MB). This reader refuses
anything the file's own size cannot hold before it loops or allocates, and keeps array
values as (offset, count) until asked: nothing it holds is larger than the header itself.

Layout (GGUF v2/v3, little-endian):
    "GGUF" | u32 version | u64 n_tensors | u64 n_kv
    n_kv      x  ( str key | u32 vtype | value )          value: scalar, str, or
                                                          u32 vtype | u64 n | n values
    n_tensors x  ( str name | u32 n_dims | u64 ne[n_dims] | u32 ggml type | u64 offset )
    padding to `general.alignment` (32) | tensor data, each at data_start + offset
    str = u64 length | UTF-8 bytes.   ne[0] is the row length (the fastest axis).
"""

from __future__ import annotations

import itertools
import math
import struct
from dataclasses import dataclass
from pathlib import Path

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf import GGUFValueType as V

from runtime.base.errors import StepstreamError

MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_NAME = 63  # bytes in a tensor name: llama.cpp refuses names of GGML_MAX_NAME (64) or more
MAX_KEY = 1 << 16  # bytes in a metadata key; no writer comes near, and a key is copied to be decoded
DEFAULT_ALIGNMENT = 32
_SCALAR = {V.UINT8: "B", V.INT8: "b", V.UINT16: "H", V.INT16: "h", V.UINT32: "I", V.INT32: "i",
           V.FLOAT32: "f", V.BOOL: "?", V.UINT64: "Q", V.INT64: "q", V.FLOAT64: "d"}
_U64 = struct.Struct("<Q")
_MIN_KV = 8 + 4 + 1  # empty key, type, one-byte value
_MIN_TENSOR = 8 + 4 + 8 + 4 + 8  # empty name, one dimension, type, offset


@dataclass(frozen=True)
class Field:
    """A metadata value where it lies: `count` elements of `vtype` (a scalar or str: count 1)
    from byte `offset`; arrays carry their element type in `item`."""

    vtype: V
    offset: int
    count: int = 1
    item: V | None = None


@dataclass(frozen=True)
class TensorInfo:
    name: str
    qtype: GGMLQuantizationType
    ne: tuple[int, ...]  # ggml order: ne[0] is the row length
    offset: int  # absolute byte offset of the data in the file
    n_bytes: int


@dataclass(frozen=True)
class Header:
    version: int
    fields: dict[str, Field]
    tensors: list[TensorInfo]
    alignment: int
    data_start: int


class Truncated(StepstreamError):
    """The bytes given end inside the header, and the file goes on (`header_end` on a prefix)."""


class _Cursor:
    """Reads forward through `buf`; any read past its end is the file's fault, worded so, unless
    `buf` is a prefix of a file of `size` bytes: then it is Truncated (more bytes are needed)."""

    def __init__(self, buf, path: Path, size: int | None = None):
        self.buf, self.path, self.pos = buf, path, 0
        self.size = len(buf) if size is None else size

    def fail(self, what: str):
        raise StepstreamError(f"{self.path}: {what}; the file is truncated or corrupt")

    def short(self, what: str):
        """Past the end of `buf`: a prefix needs more bytes; a whole file is truncated or corrupt."""
        if self.size > len(self.buf):
            raise Truncated(f"{self.path}: {what}: the header goes on past the first {len(self.buf)} bytes")
        self.fail(what)

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            self.fail(f"{what} at byte {self.pos} needs {n} bytes, the file has {self.size - self.pos} left")
        if self.pos + n > len(self.buf):
            self.short(f"{what} at byte {self.pos} needs {n} bytes")

    def unpack(self, fmt: str, what: str):
        size = struct.calcsize("<" + fmt)
        self.need(size, what)
        v = struct.unpack_from("<" + fmt, self.buf, self.pos)[0]
        self.pos += size
        return v

    def string(self, what: str, limit: int) -> str:
        n = self.unpack("Q", what)
        if n > limit:
            self.fail(f"{what} at byte {self.pos - 8} is {n} bytes long, over the {limit} allowed")
        self.need(n, what)
        raw = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            self.fail(f"{what} at byte {self.pos - n} is not UTF-8 ({raw[:40]!r})")

    def skip_strings(self, count: int, what: str) -> None:
        buf, pos, end, u64 = self.buf, self.pos, len(self.buf), _U64.unpack_from  # hot: 10^5 tokens
        for k in range(count):
            n = u64(buf, pos)[0] if pos + 8 <= end else None
            if n is None or pos + 8 + n > end:
                self.pos = pos
                text = (f"{what}: string {k + 1} of {count} at byte {pos} "
                        f"({'its length' if n is None else f'{n} bytes'}) runs past the end of the file")
                if n is not None and pos + 8 + n > self.size:  # past the file itself: corrupt, not short
                    self.fail(text)
                self.short(text)
            pos += 8 + n
        self.pos = pos

    def vtype(self, what: str) -> V:
        raw = self.unpack("I", what)
        try:
            return V(raw)
        except ValueError:
            self.fail(f"{what} has unknown value type {raw}")


def _value(c: _Cursor, key: str) -> Field:
    what = f"metadata key {key!r}"
    vtype = c.vtype(what)
    start = c.pos
    if vtype in _SCALAR:
        c.need(struct.calcsize(_SCALAR[vtype]), what)
        c.pos += struct.calcsize(_SCALAR[vtype])
        return Field(vtype, start)
    if vtype == V.STRING:
        c.skip_strings(1, what)
        return Field(vtype, start)
    item = c.vtype(what + " (array)")
    count = c.unpack("Q", what + " (array length)")
    start = c.pos
    if item == V.ARRAY:
        c.fail(f"{what} is an array of arrays, which GGUF readers do not take")
    if item == V.STRING:
        c.need(8 * count, f"{what}: {count} strings")
        c.skip_strings(count, what)
    else:
        c.need(count * struct.calcsize(_SCALAR[item]), f"{what}: {count} values of {item.name}")
        c.pos += count * struct.calcsize(_SCALAR[item])
    return Field(vtype, start, count, item)


_REMOVED_TYPES = {4: "Q4_2", 5: "Q4_3", 31: "Q4_0_4_4", 32: "Q4_0_4_8", 33: "Q4_0_8_8", 36: "IQ4_NL_4_4",
                  37: "IQ4_NL_4_8", 38: "IQ4_NL_8_8"}  # ids ggml gave up; llama.cpp refuses them too
_NEWER_TYPES = {42: "Q2_0"}  # ids llama.cpp's quantizer writes that the gguf library here does not know


def _unknown_type(raw: int) -> str:
    if raw in _REMOVED_TYPES:
        return (f"is {_REMOVED_TYPES[raw]} (type id {raw}), a layout llama.cpp has removed (it repacks Q4_0 and "
                "IQ4_NL in memory now); convert or quantize the model again with a current llama.cpp or stepstream")
    if raw in _NEWER_TYPES:
        return (f"is {_NEWER_TYPES[raw]} (type id {raw}), a format stepstream cannot run; quantize the model with "
                "another preset (Q2_K, IQ2_XS and every K-quant and IQ type run)")
    return f"has type id {raw}, which is no GGML tensor type; the file is corrupt or newer than this stepstream"


def _tensor_info(c: _Cursor, i: int) -> tuple[str, GGMLQuantizationType, tuple[int, ...], int, int]:
    name = c.string(f"name of tensor {i}", MAX_NAME)
    what = f"tensor {name!r}"
    n_dims = c.unpack("I", what + " dimension count")
    if not 1 <= n_dims <= MAX_DIMS:
        c.fail(f"{what} has {n_dims} dimensions (1..{MAX_DIMS} allowed)")
    ne = tuple(c.unpack("Q", what + " shape") for _ in range(n_dims))
    raw = c.unpack("I", what + " type")
    try:
        qtype = GGMLQuantizationType(raw)
        block, type_size = GGML_QUANT_SIZES[qtype]
    except (ValueError, KeyError):
        raise StepstreamError(f"{c.path}: tensor {name!r} {_unknown_type(raw)}") from None
    if ne[0] % block:
        raise StepstreamError(f"{c.path}: tensor {name!r} has rows of {ne[0]} weights, not a multiple of the "
                              f"{qtype.name} block of {block}; the file is corrupt")
    offset = c.unpack("Q", what + " data offset")
    return name, qtype, ne, offset, math.prod(ne) // block * type_size


def _alignment(c: _Cursor, buf, fields: dict[str, Field]) -> int:
    f = fields.get("general.alignment")
    if f is None:
        return DEFAULT_ALIGNMENT
    if f.vtype != V.UINT32:
        c.fail(f"general.alignment is a {f.vtype.name}, GGUF stores it as UINT32")
    a = struct.unpack_from("<I", buf, f.offset)[0]
    if a == 0 or a & (a - 1):
        c.fail(f"general.alignment is {a}, not a power of two")
    return a


def read_header(buf, path: Path) -> Header:
    """Parse the header in `buf` (the whole file: bytes, mmap or memoryview) and check that every
    tensor lies inside the file, aligned, with no two tensors sharing a byte."""
    version, fields, infos, alignment, data_start = _parse(_Cursor(buf, path), buf)
    tensors = _place(path, len(buf), infos, data_start, alignment)
    return Header(version, fields, tensors, alignment, data_start)


def header_end(prefix, path: Path, size: int) -> int:
    """Where the tensor data begins in a GGUF of `size` bytes that starts with `prefix` (its
    header read from another machine, runtime.hub); Truncated when the header goes on past it."""
    return _parse(_Cursor(prefix, path, size), prefix)[4]


def _parse(c: _Cursor, buf) -> tuple:
    """(version, fields, tensor infos, alignment, data_start) of the header `c` reads."""
    if c.unpack("4s", "magic") != b"GGUF":
        c.fail("not a GGUF file")
    version = c.unpack("I", "version")
    if version & 0xFFFF == 0 and version:
        raise StepstreamError(f"{c.path}: a big-endian GGUF; stepstream reads little-endian files only")
    if version not in (2, 3):
        raise StepstreamError(f"{c.path}: GGUF version {version}; stepstream reads versions 2 and 3")
    n_tensors = c.unpack("Q", "tensor count")
    n_kv = c.unpack("Q", "metadata count")
    room = c.size - c.pos
    if n_kv * _MIN_KV + n_tensors * _MIN_TENSOR > room:
        c.fail(f"the header declares {n_kv} metadata keys and {n_tensors} tensors, more than its "
               f"{room} bytes can hold")
    fields: dict[str, Field] = {}
    for i in range(n_kv):
        key = c.string(f"metadata key {i}", MAX_KEY)
        if key in fields:
            c.fail(f"metadata key {key!r} appears twice")
        fields[key] = _value(c, key)
    infos = [_tensor_info(c, i) for i in range(n_tensors)]
    alignment = _alignment(c, buf, fields)
    return version, fields, infos, alignment, -(-c.pos // alignment) * alignment


def _place(path: Path, size: int, infos, data_start: int, alignment: int) -> list[TensorInfo]:
    tensors, names = [], set()
    for name, qtype, ne, offset, n_bytes in infos:
        if name in names:
            raise StepstreamError(f"{path}: tensor {name!r} appears twice")
        names.add(name)
        if offset % alignment:
            raise StepstreamError(f"{path}: tensor {name!r} starts at data offset {offset}, not a multiple of "
                                  f"the alignment {alignment}; the file is corrupt")
        start = data_start + offset
        if start + n_bytes > size:
            raise StepstreamError(f"{path}: tensor {name!r} ({qtype.name} {list(ne)}, {n_bytes} bytes) ends at "
                                  f"byte {start + n_bytes}, past the end of the file ({size} bytes); the file is "
                                  "truncated")
        tensors.append(TensorInfo(name, qtype, ne, start, n_bytes))
    by_start = sorted((t for t in tensors if t.n_bytes), key=lambda t: t.offset)
    for a, b in itertools.pairwise(by_start):
        if b.offset < a.offset + a.n_bytes:
            raise StepstreamError(f"{path}: tensors {a.name!r} (bytes {a.offset}..{a.offset + a.n_bytes}) and "
                                  f"{b.name!r} (from byte {b.offset}) overlap; the file is corrupt")
    return tensors


def decode(buf, f: Field):
    """A field's value: a Python scalar, str, or list of them."""
    if f.item is None:
        return _one(buf, f.vtype, f.offset)[0]
    if f.item != V.STRING:
        fmt = _SCALAR[f.item]
        return list(struct.unpack_from(f"<{f.count}{fmt}", buf, f.offset)) if f.count else []
    out, pos = [], f.offset
    for _ in range(f.count):
        s, pos = _one(buf, V.STRING, pos)
        out.append(s)
    return out


def _one(buf, vtype: V, pos: int):
    if vtype == V.STRING:
        n = struct.unpack_from("<Q", buf, pos)[0]
        return str(buf[pos + 8 : pos + 8 + n], "utf-8"), pos + 8 + n  # no intermediate copy
    fmt = "<" + _SCALAR[vtype]
    return struct.unpack_from(fmt, buf, pos)[0], pos + struct.calcsize(fmt)
