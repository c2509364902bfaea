"""The progress record that lets `stepstream convert --resume` continue an interrupted run.

Next to its `.part` the converter keeps `.part.json`: the key of the conversion and how many
tensors are complete, with the file offset where the last one ends. The record is replaced
(write, fsync, rename) only after the data it describes has been fsynced, so after a crash it
never claims bytes that are not on disk. The key is a hash of every byte written before the
tensor data (GGUF header, metadata with the tokenizer, tensor infos: they fix every name,
format and offset), of the quantizers' source code, and of each shard's name, size, times and
inode: a resumed run continues only a conversion of the same checkpoint with the same options
and the same code.

A run with --resume adopts the `.part` of a conversion whose process is gone (killed, or
interrupted with --resume) by renaming it to its own `.part` name: a rename succeeds for one
process only, so two resuming runs never write the same file.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
from dataclasses import dataclass
from pathlib import Path

from convert import fp8_source, tensor_stream
from convert.output_file import dead_parts, part_name
from convert.safetensors_io import Checkpoint
from quant import codec, fp8, kquant, kquant_q2q3, reference

VERSION = 1


@dataclass(frozen=True)
class Progress:
    key: str
    done: int  # tensors complete, in write order
    end: int  # file offset just after the last complete tensor


def record_path(part: Path) -> Path:
    return part.with_name(part.name + ".json")


# The modules whose code decides the bytes of a tensor: a .part written by other code is not continued.
_WRITERS = (kquant, kquant_q2q3, codec, reference, tensor_stream, fp8, fp8_source)


def _code_digest() -> bytes:
    h = hashlib.sha256()
    for module in _WRITERS:
        h.update(Path(inspect.getsourcefile(module)).read_bytes())
    return h.digest()


def conversion_key(header: bytes, ckpt: Checkpoint, reading: str = "") -> str:
    """The identity of a conversion: its header, the code that quantizes, and each shard's
    name, size, times and inode (a copy of other weights keeps sizes and, with `cp -p`, the
    modification time, but never the inode and change time). `reading`: what else decides how
    the weights are read and is in neither (an FP8 checkpoint's quantization_config)."""
    h = hashlib.sha256(f"stepstream-convert-{VERSION}".encode())
    h.update(hashlib.sha256(header).digest())
    h.update(hashlib.sha256(reading.encode()).digest())
    h.update(_code_digest())
    for shard in sorted(ckpt.shards):
        st = ckpt.shards[shard].path.stat()
        h.update(f"{shard}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}\0{st.st_dev}\0{st.st_ino}\0".encode())
    return h.hexdigest()


def save(part: Path, progress: Progress) -> None:
    """Replace the record atomically; the caller has fsynced the data it describes."""
    rec = record_path(part)
    tmp = rec.with_name(rec.name + ".tmp")
    try:
        with open(tmp, "w") as f:
            json.dump({"version": VERSION, "key": progress.key, "done": progress.done, "end": progress.end}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, rec)
    except BaseException:  # a full disk, say: the last record stays, and no half-written one beside it
        tmp.unlink(missing_ok=True)
        raise


def load(part: Path) -> Progress | None:
    """The record of `part`, or None when there is none or it cannot be read."""
    try:
        d = json.loads(record_path(part).read_text())
        p = Progress(str(d["key"]), int(d["done"]), int(d["end"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return p if d.get("version") == VERSION and p.done >= 0 and p.end >= 0 else None


def remove(part: Path) -> None:
    part.unlink(missing_ok=True)
    record_path(part).unlink(missing_ok=True)
    record_path(part).with_name(record_path(part).name + ".tmp").unlink(missing_ok=True)


def adopt(out: Path, key: str) -> Progress | None:
    """Take over the `.part` of a dead conversion to `out` with this key; its progress, or None."""
    mine = part_name(out)
    p = load(mine)  # an earlier run with this process's PID (a container's PID 1, say)
    if mine.exists() and p is not None and p.key == key:
        return p
    for part in dead_parts(out):
        p = load(part)
        if p is None or p.key != key:
            continue
        try:
            os.rename(part, mine)  # only one process wins
        except OSError:
            continue
        save(mine, p)
        record_path(part).unlink(missing_ok=True)
        return p
    return None


def other_conversion(out: Path) -> tuple[Path, int] | None:
    """A dead conversion's `.part` to `out` with a readable record and complete tensors (one
    that adopt() did not take: its key differs), and how many tensors it holds; else None."""
    for part in dead_parts(out):
        p = load(part)
        if p is not None and p.done > 0:
            return part, p.done
    return None
