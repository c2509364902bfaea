"""A saved KV-cache state (runtime.model.kv_state.SavedState) as a file: the prompt cache's disk
tier (serve --cache-dir: a conversation's cache outlives the server, and a restarted server
answers its next turn without evaluating the prompt again), `run --prompt-cache`, and the
Python API's Model.save_state_file / load_state_file.

    write(path, state, identity)      to a temporary name, then renamed: never half a file
    header = read_header(path)        JSON only: whose state, which tokens, how big
    state = read_state(path, header)  the arrays, each checked against its length and CRC-32

Layout: MAGIC, the header's length (8 bytes, little-endian) and CRC-32 (4 bytes), the header
(JSON), zero padding to 64 bytes, then the arrays' bytes, each at the offset the header gives,
with its own CRC-32. Nothing is unpickled, and every field of the header is checked for its
type and range: a file from anywhere can only fail to load, with a StateFileError naming it.
The arrays are mapped, not read into fresh memory: loading copies them from the page cache
into the KV cache. `identity` is the model file's name, size and modification time and
whatever else changes the cache's values (the activations' rounding): a state is offered to
the same file run the same way only (a file replaced under the same name has another time).
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


def model_identity(path: Path, variant: str = "") -> str:
    """The model file's name, size and modification time, and `variant` (what else changes the
    KV cache's values: "activations q8")."""
    st = Path(path).stat()
    return f"{Path(path).name} ({st.st_size} bytes, modified {st.st_mtime_ns})" + (f"; {variant}" if variant else "")


def variant(activations: str, gpu: bool) -> str:
    """What besides the model file changes a saved state's values: the activations' rounding, and
    the GPU tier's kernels."""
    return f"activations {activations}" + ("; gpu tier" if gpu else "")


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
    start = _start(len(head))
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(MAGIC + len(head).to_bytes(8, "little") + zlib.crc32(head).to_bytes(4, "little") + head)
            f.write(b"\0" * (start - f.tell()))
            for a in arrays:
                f.write(_bytes(a))
            f.flush()
            os.fsync(f.fileno())  # on the disk before the rename: a crash leaves the old file or the new
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return start + offset


def _start(n_header: int) -> int:
    return -(-(len(MAGIC) + 12 + n_header) // ALIGN) * ALIGN


def read_header(path: Path) -> dict:
    """The header of the state file at `path`, checked field by field, with "start" (where its
    arrays begin) added."""
    try:
        with open(path, "rb") as f:
            magic = f.read(len(MAGIC))
            if magic != MAGIC:
                raise StateFileError(f"{path}: not a stepstream KV-cache state (or of another format version)")
            n = int.from_bytes(f.read(8), "little")
            crc = int.from_bytes(f.read(4), "little")
            if not 0 < n < 1 << 30:
                raise StateFileError(f"{path}: damaged state file (a header of {n} bytes)")
            raw = f.read(n)
        if len(raw) != n or zlib.crc32(raw) != crc:
            raise StateFileError(f"{path}: damaged state file (its header is short or does not match its CRC-32)")
        header = json.loads(raw)
    except (OSError, ValueError) as e:
        raise StateFileError(f"{path}: unreadable state file: {e}") from None
    problem = _header_problem(header)
    if problem:
        raise StateFileError(f"{path}: damaged state file ({problem})")
    header["start"] = _start(n)
    return header


def _is_int(v, lo: int = 0, hi: int = 1 << 62) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and lo <= v < hi


def _array_problem(d) -> str | None:
    if d is None:
        return None
    if not isinstance(d, dict) or not isinstance(d.get("dtype"), str) or not isinstance(d.get("shape"), list):
        return "an array without its dtype or shape"
    if not all(_is_int(v) for v in (d.get("offset"), d.get("nbytes"))) or not _is_int(d.get("crc32"), 0, 1 << 32):
        return "an array's offset, size or CRC-32 is not a count"
    if not all(_is_int(x) for x in d["shape"]):
        return "an array's shape is not a list of counts"
    try:
        dtype = np.dtype(d["dtype"])
    except (TypeError, ValueError):
        return f"an array's dtype {d['dtype']!r:.20} is no dtype"
    if dtype.kind not in "biuf" or dtype.subdtype is not None or dtype.names is not None:
        return f"an array's dtype {d['dtype']!r:.20} is no plain number type"
    return None


def _header_problem(h) -> str | None:
    """What is wrong with a parsed header, or None."""
    if not isinstance(h, dict):
        return "its header is not an object"
    if not isinstance(h.get("identity"), str) or not isinstance(h.get("model"), str):
        return "its identity or model is not text"
    layout = h.get("layout")
    if not isinstance(layout, list) or not all(
            isinstance(b, list) and len(b) == 6 and isinstance(b[0], bool) and all(_is_int(x) for x in b[1:4])
            and isinstance(b[4], str) and isinstance(b[5], str) for b in layout):
        return "its cache layout is not a list of blocks"
    tokens = h.get("tokens")
    if not isinstance(tokens, list) or not tokens or not all(_is_int(t, 0, 1 << 31) for t in tokens):
        return "its tokens are not token ids"
    if not isinstance(h.get("oldest_kept"), list) or not all(_is_int(x) for x in h["oldest_kept"]):
        return "its ring positions are not counts"
    slots = h.get("slots")
    if not isinstance(slots, list) or len(slots) != len(layout) or not all(isinstance(b, list) for b in slots):
        return "its blocks do not match its layout"
    problems = [_array_problem(d) for b in slots for d in b]
    cp = h.get("checkpoint")
    if cp is not None:
        if not isinstance(cp, dict) or not _is_int(cp.get("n_past")) or not isinstance(cp.get("rings"), list):
            return "its checkpoint is not a position and rings"
        for r in cp["rings"]:
            if not isinstance(r, dict) or not _is_int(r.get("index"), 0, len(layout)):
                return "a ring of its checkpoint names no block"
            problems += [_array_problem(r.get(name)) for name in ("k", "v", "pos", "ks", "vs")]
            if r.get("k") is None or r.get("v") is None or r.get("pos") is None:
                return "a ring of its checkpoint lacks its keys, values or positions"
    return next((p for p in problems if p), None)


def _array(data: np.ndarray, path: Path, d: dict | None) -> np.ndarray | None:
    """The array `d` describes, a view of the file's mapped bytes `data`, its CRC-32 checked."""
    if d is None:
        return None
    try:
        dtype, shape = np.dtype(d["dtype"]), tuple(d["shape"])
        if dtype.hasobject or dtype.subdtype is not None or dtype.names is not None:
            raise ValueError(f"dtype {d['dtype']!r} is no plain number type")
        if int(np.prod(shape, dtype=object)) * dtype.itemsize != d["nbytes"]:
            raise ValueError("an array's size does not match its shape")
        end = d["offset"] + d["nbytes"]
        if end > data.size:
            raise ValueError("an array ends past the end of the file")
        raw = data[d["offset"]:end]
    except (TypeError, ValueError) as e:
        raise StateFileError(f"{path}: damaged state file ({e})") from None
    if zlib.crc32(raw) != d["crc32"]:
        raise StateFileError(f"{path}: damaged state file (an array's bytes do not match their CRC-32)")
    return raw.view(dtype).reshape(shape)


def _copy(a: np.ndarray | None) -> np.ndarray | None:
    return None if a is None else np.array(a)


def read_state(path: Path, header: dict) -> SavedState:
    """The state the file holds (its header from read_header): the slots' arrays mapped read-only,
    the checkpoint's copied."""
    start = header["start"]
    try:
        size = Path(path).stat().st_size
        data = np.memmap(path, np.uint8, mode="r", offset=start, shape=(size - start,)) if size > start else \
            np.zeros(0, np.uint8)
    except (OSError, ValueError) as e:
        raise StateFileError(f"{path}: unreadable state file: {e}") from None
    slots = tuple(tuple(_array(data, path, d) for d in block) for block in header["slots"])
    cp = header.get("checkpoint")
    checkpoint = None
    if cp is not None:
        # copied out of the map: a loaded state's checkpoint stays with the model (the next prompt
        # may return to it), and a view kept the file's blocks on disk after the disk tier removed
        # it, beyond --cache-dir-size (a review's finding). The rings are one window each: small.
        rings = tuple(RingCopy(r["index"], *(_copy(_array(data, path, r.get(n))) for n in ("k", "v", "pos", "ks", "vs")))
                      for r in cp["rings"])
        checkpoint = KVCheckpoint(cp["n_past"], rings)
    return SavedState(header["model"], tuple(tuple(x) for x in header["layout"]), tuple(header["tokens"]), slots,
                      checkpoint)


@dataclass(frozen=True)
class _Position:
    n_past: int


@dataclass(frozen=True, eq=False)  # (compared by identity: a header holds every token)
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
