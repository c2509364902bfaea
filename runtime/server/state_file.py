"""A saved KV-cache state (runtime.model.kv_state.SavedState) as a file, for the prompt cache's
disk tier (serve --cache-dir): a conversation's cache outlives the server, and a restarted
server answers its next turn without evaluating the prompt again.

    write(path, state, identity)      to a temporary name, then renamed: never half a file
    header = read_header(path)        JSON only: whose state, which tokens, how big
    state = read_state(path, header)  the arrays, each checked against its length and CRC-32

Layout: MAGIC, the header's length (8 bytes, little-endian), the header (JSON), zero padding
to 64 bytes, then the arrays' bytes, each at the offset the header gives. Nothing is
unpickled: a file from anywhere can only fail to load, with a StepstreamError naming it.
`identity` is the model file's name, size and modification time: a state is offered to the
same file only (a file replaced under the same name has another time).
"""

from __future__ import annotations

import json
import os
import zlib
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from runtime.base.errors import StepstreamError
from runtime.model.kv_checkpoint import KVCheckpoint, RingCopy
from runtime.model.kv_state import SavedState

MAGIC = b"STEPSTREAM-KV\x00\x01\x00"  # 16 bytes; the last two: format version 1
ALIGN = 64
SUFFIX = ".kvstate"


class StateFileError(StepstreamError):
    """A file that is no state, or a damaged one."""


def model_identity(path: Path) -> str:
    st = Path(path).stat()
    return f"{Path(path).name} ({st.st_size} bytes, modified {st.st_mtime_ns})"


def _bytes(a: np.ndarray) -> np.ndarray:
    """The array's bytes, flat (an empty array too: a memoryview cannot cast a shape with a 0)."""
    return np.ascontiguousarray(a).reshape(-1).view(np.uint8)


def _describe(a: np.ndarray | None, offset: int) -> tuple[dict | None, int]:
    if a is None:
        return None, offset
    return {"dtype": a.dtype.str, "shape": list(a.shape), "offset": offset, "nbytes": a.nbytes,
            "crc32": zlib.crc32(_bytes(a))}, offset + a.nbytes


def write(path: Path, state: SavedState, identity: str) -> int:
    """Write `state` to `path` (atomically); returns the file's size."""
    arrays: list[np.ndarray] = []
    offset = 0
    slots = []
    for block in state.slots:
        described = []
        for a in block:
            d, offset = _describe(a, offset)
            described.append(d)
            arrays.append(a)
        slots.append(described)
    rings = None
    if state.checkpoint is not None:
        rings = []
        for r in state.checkpoint.rings:
            entry = {"index": r.index}
            for name in ("k", "v", "pos", "ks", "vs"):
                a = getattr(r, name)
                entry[name], offset = _describe(a, offset)
                if a is not None:
                    arrays.append(a)
            rings.append(entry)
    header = {"identity": identity, "model": state.model, "layout": [list(x) for x in state.layout],
              "tokens": list(state.tokens), "oldest_kept": state.oldest_kept(), "slots": slots,
              "checkpoint": None if rings is None else {"n_past": state.checkpoint.n_past, "rings": rings}}
    head = json.dumps(header, separators=(",", ":")).encode()
    start = -(-(len(MAGIC) + 8 + len(head)) // ALIGN) * ALIGN
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(MAGIC + len(head).to_bytes(8, "little") + head)
            f.write(b"\0" * (start - f.tell()))
            for a in arrays:
                f.write(_bytes(a))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return start + offset


def read_header(path: Path) -> dict:
    """The header of the state file at `path`, with "start" (where its arrays begin) added."""
    try:
        with open(path, "rb") as f:
            magic = f.read(len(MAGIC))
            if magic != MAGIC:
                raise StateFileError(f"{path}: not a stepstream KV-cache state (or of another format version)")
            n = int.from_bytes(f.read(8), "little")
            if not 0 < n < 1 << 30:
                raise StateFileError(f"{path}: damaged state file (a header of {n} bytes)")
            header = json.loads(f.read(n))
    except (OSError, ValueError) as e:
        raise StateFileError(f"{path}: unreadable state file: {e}") from None
    if not isinstance(header, dict) or not {"identity", "model", "layout", "tokens", "oldest_kept",
                                            "slots"} <= header.keys():
        raise StateFileError(f"{path}: damaged state file (its header lacks fields)")
    header["start"] = -(-(len(MAGIC) + 8 + n) // ALIGN) * ALIGN
    return header


def _array(f, path: Path, start: int, d: dict | None) -> np.ndarray | None:
    if d is None:
        return None
    try:
        dtype, shape = np.dtype(d["dtype"]), tuple(int(x) for x in d["shape"])
        if dtype.hasobject or int(np.prod(shape, dtype=np.int64)) * dtype.itemsize != d["nbytes"]:
            raise ValueError("its size does not match its shape")
        a = np.empty(shape, dtype)
        f.seek(start + int(d["offset"]))
        got = f.readinto(_bytes(a)) if a.nbytes else 0
    except (KeyError, TypeError, ValueError, OSError, MemoryError) as e:
        raise StateFileError(f"{path}: damaged state file ({type(e).__name__}: {e})") from None
    if got != a.nbytes or zlib.crc32(_bytes(a)) != d["crc32"]:
        raise StateFileError(f"{path}: damaged state file (an array's bytes are short or do not match their CRC-32)")
    return a


def read_state(path: Path, header: dict) -> SavedState:
    """The state the file holds (its header from read_header)."""
    start = header["start"]
    try:
        with open(path, "rb") as f:
            slots = tuple(tuple(_array(f, path, start, d) for d in block) for block in header["slots"])
            cp = header.get("checkpoint")
            checkpoint = None
            if cp is not None:
                rings = tuple(RingCopy(int(r["index"]), *(_array(f, path, start, r[n]) for n in ("k", "v", "pos", "ks",
                                                                                                   "vs")))
                              for r in cp["rings"])
                checkpoint = KVCheckpoint(int(cp["n_past"]), rings)
    except OSError as e:
        raise StateFileError(f"{path}: unreadable state file: {e}") from None
    except (KeyError, TypeError, ValueError) as e:
        raise StateFileError(f"{path}: damaged state file ({e})") from None
    return SavedState(header["model"], tuple(tuple(x) for x in header["layout"]), tuple(header["tokens"]), slots,
                      checkpoint)


@dataclass(frozen=True)
class _Position:
    n_past: int


@dataclass(frozen=True)
class StateOnDisk:
    """A state file by its header: what Model.reusable needs to score it (its tokens, its
    checkpoint's position, the oldest position each ring keeps) without reading its arrays."""

    path: Path
    header: dict
    nbytes: int

    @cached_property
    def tokens(self) -> tuple:
        return tuple(self.header["tokens"])

    @property
    def checkpoint(self) -> _Position | None:
        cp = self.header.get("checkpoint")
        return None if cp is None else _Position(int(cp["n_past"]))

    def oldest_kept(self) -> list[int]:
        return [int(x) for x in self.header["oldest_kept"]]

    @property
    def layout(self) -> tuple:
        return tuple(tuple(x) for x in self.header["layout"])

    def load(self) -> SavedState:
        return read_state(self.path, self.header)
