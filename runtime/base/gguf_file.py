"""Opening a GGUF model, single-file or split, with every failure worded for the user.

The header is read by runtime.base.gguf_header, which checks every count, offset and size
against the file before it loops or allocates. Tensor data stays memory-mapped read-only:
nothing is read from disk until compute touches it. A split model is the set
`PREFIX-0000k-of-0000n.gguf`, k = 1..n; metadata lives in the first part, tensors are
spread over all of them. Any part may be named.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import re
import signal
import threading
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import gguf
import numpy as np
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q

from runtime.base.errors import StepstreamError
from runtime.base.gguf_header import Header, TensorInfo, decode, read_header
from runtime.base.gguf_schema import Key

_SPLIT = re.compile(r"^(?P<prefix>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")


@dataclass(frozen=True)
class TensorRef:
    """A tensor's raw bytes in the map and how to read them.

    `data` is gguf-py's view: float types as their numpy dtype in numpy order
    (shape = reversed ne[]); block-quantized types as uint8 with the last axis in bytes.
    """

    name: str
    qtype: gguf.GGMLQuantizationType
    shape: tuple[int, ...]  # numpy order, elements: e.g. [out, in] for a matrix
    data: np.ndarray
    path: Path
    offset: int = 0  # absolute byte offset of the data in `path`


def split_parts(path: Path) -> list[Path]:
    m = _SPLIT.match(path.name)
    if m is None:
        return [path]
    count = int(m["count"])
    if count < 1:
        raise StepstreamError(f"{path}: split file name says it has {count} parts")
    return [path.with_name(f"{m['prefix']}-{k:05d}-of-{m['count']}.gguf") for k in range(1, count + 1)]


# gguf-py's numpy view of each type: float and integer types typed, block types as bytes.
_NUMPY = {Q.F32: np.float32, Q.F16: np.float16, Q.F64: np.float64, Q.I8: np.int8, Q.I16: np.int16,
          Q.I32: np.int32, Q.I64: np.int64}


@dataclass(eq=False)
class _Part:
    path: Path
    header: Header
    data: np.memmap
    bytes: memoryview  # the same map; struct reads from it without numpy's per-slice cost
    fd: int = -1  # held open to see the file change under the map (GGUFModelFile.check_unchanged)
    stamp: tuple[int, int] = (0, 0)  # (size, mtime in ns) when it was mapped
    leased: bool = False  # a read lease on fd is held (see _Leases)
    broken: bool = False  # another process asked to write or truncate the file (SIGIO)
    file: object = None  # a weak reference to the GGUFModelFile, for its evaluations in flight
    closer: object = None  # closes fd (a weakref.finalize: at most once)

    def in_flight(self) -> int:
        owner = self.file() if self.file is not None else None
        return 0 if owner is None else owner.in_flight

    def changed(self) -> str | None:
        """How the file differs from when it was mapped, or None (also once closed)."""
        if self.fd < 0:
            return None
        st = os.fstat(self.fd)
        if st.st_size != self.stamp[0]:
            return f"it is {st.st_size} bytes, it was {self.stamp[0]}"
        if st.st_mtime_ns != self.stamp[1]:
            return "it was written to"
        return None

    def release(self) -> None:
        if self.leased:
            self.leased = False
            try:
                fcntl.fcntl(self.fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
            except OSError:
                pass


class _Leases:
    """Read leases on the mapped files, so that no other process can cut a file short or
    rewrite it while an evaluation reads its map (a file cut short under a map kills the
    process with SIGBUS at the first page past its new end).

    Linux holds back another process's open for writing, its O_TRUNC or its truncate(2) of a
    leased file, and tells the holder with SIGIO; the writer waits until the lease is let go
    (at most /proc/sys/fs/lease-break-time, 45 s by default). Here SIGIO marks the part
    broken and lets the lease go at once when no evaluation is reading the map, else when the
    evaluation in flight ends (GGUFModelFile.evaluating); the next evaluation then finds the
    change, or takes the lease again if the writer gave up (coreutils' `truncate` opens with
    O_NONBLOCK, so it fails at once with "Resource temporarily unavailable" and the file is
    kept whole). Leases need the main thread (for the handler), Linux, a local file system and
    the file's owner (or CAP_LEASE); without them the size and time check before each
    evaluation is what is left."""

    parts: "weakref.WeakSet[_Part]" = weakref.WeakSet()
    previous = None
    installed = False

    @classmethod
    def take(cls, part: _Part) -> bool:
        if not hasattr(fcntl, "F_SETLEASE") or threading.current_thread() is not threading.main_thread():
            return False
        if not cls.installed:
            try:
                cls.previous = signal.signal(signal.SIGIO, cls.on_signal)
            except (ValueError, OSError):
                return False
            cls.installed = True
        try:
            fcntl.fcntl(part.fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
        except OSError:  # not the owner, no lease support, or a writer has it open: no lease
            return False
        part.leased = True
        cls.parts.add(part)
        return True

    @classmethod
    def on_signal(cls, signum, frame) -> None:
        for part in list(cls.parts):
            if not part.leased:
                continue
            try:
                breaking = fcntl.fcntl(part.fd, fcntl.F_GETLEASE) == fcntl.F_UNLCK  # a break names its target
            except OSError:
                continue
            if breaking:
                part.broken = True
                if part.in_flight() == 0:
                    part.release()
        if callable(cls.previous):
            cls.previous(signum, frame)


def _open_part(path: Path) -> _Part:
    if not path.exists():
        raise StepstreamError(f"{path}: file not found")
    if path.is_dir():
        raise StepstreamError(f"{path}: is a directory, not a GGUF file")
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:  # permissions, an I/O error: a traceback before
        raise StepstreamError(f"{path}: cannot open for reading ({e.strerror or e})") from None
    if magic != b"GGUF":
        raise StepstreamError(f"{path}: not a GGUF file (starts with {magic!r}, expected b'GGUF')")
    try:
        data = np.memmap(path, mode="r")
    except (OSError, ValueError) as e:
        raise StepstreamError(f"{path}: cannot map the file ({e}){_address_space_hint(path, e)}") from None
    view = memoryview(data)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        raise StepstreamError(f"{path}: cannot open for reading ({e.strerror or e})") from None
    st = os.fstat(fd)
    part = _Part(path, read_header(view, path), data, view, fd, (st.st_size, st.st_mtime_ns))
    part.closer = weakref.finalize(part, os.close, fd)  # closing the descriptor lets its lease go too
    _Leases.take(part)
    return part


def _address_space_hint(path: Path, e: Exception) -> str:
    """Why a map failed for lack of address space: the whole file is mapped (experts too, read
    through it or streamed), so RLIMIT_AS (`ulimit -v`) must exceed the file's size."""
    try:
        import resource
    except ImportError:
        return ""
    soft = resource.getrlimit(resource.RLIMIT_AS)[0]
    if getattr(e, "errno", None) != errno.ENOMEM or soft == resource.RLIM_INFINITY or soft < 0:
        return ""
    return (f": the address space limit (RLIMIT_AS, `ulimit -v`) is {soft / 2**30:.1f} GiB and the whole "
            f"{path.stat().st_size / 2**30:.1f} GiB file is mapped; raise it above the file's size plus a few GiB")


def _tensor_ref(part: _Part, t: TensorInfo) -> TensorRef:
    shape = tuple(reversed(t.ne))
    raw = part.data[t.offset : t.offset + t.n_bytes]
    if t.qtype in _NUMPY:
        view = raw.view(_NUMPY[t.qtype]).reshape(shape)
    else:
        block, type_size = GGML_QUANT_SIZES[t.qtype]
        view = raw.reshape(*shape[:-1], shape[-1] // block * type_size)
    return TensorRef(t.name, t.qtype, shape, view, part.path, t.offset)


class GGUFModelFile:
    """Metadata of the first part and tensors of all parts."""

    def __init__(self, path: str | Path):
        path = Path(path)
        if not path.exists():
            raise StepstreamError(f"{path}: file not found")
        parts = split_parts(path)
        missing = [p for p in parts if not p.exists()]
        if missing:
            raise StepstreamError(f"{path}: split model has {len(parts)} parts but {', '.join(p.name for p in missing)} is missing")
        self.path = parts[0]
        self.parts = parts
        self._parts = [_open_part(p) for p in parts]  # keeps the maps alive
        self.in_flight = 0  # evaluations reading the maps now (see _Leases)
        for part in self._parts:
            part.file = weakref.ref(self)  # not self: a cycle kept the maps and descriptors until a collection
        self.closed = False
        self._buf, self.fields = self._parts[0].bytes, self._parts[0].header.fields
        declared = self.get(Key.SPLIT_COUNT, None)
        if declared is not None and declared != len(parts):
            raise StepstreamError(f"{self.path}: metadata says {declared} split parts, file names say {len(parts)}")
        if declared is None and len(parts) > 1:
            raise StepstreamError(f"{self.path}: named like a split part but has no {Key.SPLIT_COUNT} metadata")
        self.tensors: dict[str, TensorRef] = {}
        for part in self._parts:
            for t in part.header.tensors:
                if t.name in self.tensors:
                    raise StepstreamError(f"{part.path}: tensor {t.name!r} also appears in {self.tensors[t.name].path.name}")
                self.tensors[t.name] = _tensor_ref(part, t)
        expected = self.get(Key.SPLIT_TENSORS, None)
        if expected is not None and expected != len(self.tensors):
            raise StepstreamError(f"{self.path}: split metadata declares {expected} tensors, the parts hold {len(self.tensors)}")

    _MISSING = object()

    def get(self, key: str, default=_MISSING):
        """A metadata value as a Python scalar, str or list; `default` when absent."""
        f = self.fields.get(key)
        if f is None:
            if default is self._MISSING:
                raise StepstreamError(f"{self.path}: required metadata key {key!r} is missing")
            return default
        try:
            return decode(self._buf, f)
        except UnicodeDecodeError as e:
            raise StepstreamError(f"{self.path}: metadata key {key!r} holds text that is not UTF-8 ({e.reason} at "
                                  f"byte {e.start})") from None

    def array_len(self, key: str) -> int | None:
        """Length of an array value without decoding it (token lists run to 10^5 strings)."""
        f = self.fields.get(key)
        return None if f is None else f.count

    def has(self, key: str) -> bool:
        return key in self.fields

    def tensor(self, name: str) -> TensorRef:
        t = self.tensors.get(name)
        if t is None:
            raise StepstreamError(f"{self.path}: tensor {name!r} is missing")
        return t

    def close(self) -> None:
        """Let the descriptors and their leases go and drop the pages the maps brought in (a
        closed model's file). The metadata stays readable; the maps go with the last array
        viewing them."""
        if self.closed:
            return
        self.closed = True
        self.release_pages()
        # The metadata from a copy of the first part's header; the tensors without their views,
        # so that the maps (and the descriptor each keeps) go once the model's arrays are gone.
        self._buf = memoryview(bytes(self._buf[: self._parts[0].header.data_start]))
        self.tensors = {name: replace(t, data=None) for name, t in self.tensors.items()}
        for part in self._parts:
            part.release()
            _Leases.parts.discard(part)
            part.fd = -1  # changed() and a lease break then leave it alone (the number may be reused)
            part.closer()
            part.data = part.bytes = None

    def held_descriptors(self) -> dict[Path, int]:
        """Each part's path and the descriptor held open on it since load: a reader that reopens
        the part through it reads the file that was loaded, even after a rename or a delete."""
        return {part.path: part.fd for part in self._parts}

    def problem(self) -> str | None:
        """Why the maps cannot be read any more (check_unchanged's message), or None; changes
        nothing, so a health check on another thread may ask."""
        for part in self._parts:
            how = part.changed() or ("another process asked to write it" if part.broken else None)
            if how is not None:
                return f"{part.path}: the file changed on disk while the model was loaded ({how})"
        return None

    def check_unchanged(self) -> None:
        """Refuse to read the maps of a file that changed on disk since it was opened: a file that
        shrank would kill the process with SIGBUS at the first page past its new end, and one
        rewritten in place would feed other weights silently. (A file replaced by a rename or
        deleted is harmless: the maps keep the old one.)"""
        for part in self._parts:
            how = part.changed()
            if how is None and part.broken:  # another process asked to write it: held back, or gave up?
                part.release()
                if _Leases.take(part):
                    part.broken = False  # it gave up, and nobody has the file open for writing now
                    how = part.changed()  # (unless it wrote before the lease was taken again)
                else:
                    how = "another process has it open for writing"
            if how is not None:
                raise StepstreamError(f"{part.path}: the file changed on disk while the model was loaded ({how}); "
                                      f"its mapped weights cannot be read any more: load it again")

    @contextmanager
    def evaluating(self):
        """Around an evaluation that reads the maps: a writer held back meanwhile (see _Leases)
        gets the file when the last evaluation in flight ends."""
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1
            if self.in_flight == 0:
                for part in self._parts:
                    if part.broken:
                        part.release()

    def release_pages(self) -> None:
        """Drop the file pages this process touched through the maps (MADV_DONTNEED).

        After the non-expert weights are copied to RAM, their mapped pages would otherwise stay
        in our RSS (and in a memory cgroup's charge) for nothing; later reads of the map fault
        in only what they need.
        """
        if not hasattr(mmap, "MADV_DONTNEED"):
            return
        for part in self._parts:
            mm = getattr(part.data, "_mmap", None)  # numpy's memmap keeps its mmap here
            if mm is not None:
                mm.madvise(mmap.MADV_DONTNEED)

    @property
    def nbytes(self) -> int:
        return sum(p.stat().st_size for p in self.parts)
