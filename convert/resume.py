"""The progress record that lets `stepstream convert --resume` continue an interrupted run.

Next to its `.part` the converter keeps `.part.json`: the key of the conversion and how many
tensors are complete, with the file offset where the last one ends. The record is replaced
(write, fsync, rename) only after the data it describes has been fsynced, so after a crash it
never claims bytes that are not on disk. The key is a hash of every byte written before the
tensor data (GGUF header, metadata with the tokenizer, tensor infos: they fix every name,
format and offset) and of each shard's name, size and modification time: a resumed run
continues only a conversion of the same checkpoint with the same options.

A run with --resume adopts the `.part` of a conversion whose process is gone (killed, or
interrupted with --resume) by renaming it to its own `.part` name: a rename succeeds for one
process only, so two resuming runs never write the same file.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from convert.output_file import dead_parts, part_name
from convert.safetensors_io import Checkpoint

VERSION = 1


@dataclass(frozen=True)
class Progress:
    key: str
    done: int  # tensors complete, in write order
    end: int  # file offset just after the last complete tensor


def record_path(part: Path) -> Path:
    return part.with_name(part.name + ".json")


def conversion_key(header: bytes, ckpt: Checkpoint) -> str:
    h = hashlib.sha256(f"stepstream-convert-{VERSION}".encode())
    h.update(hashlib.sha256(header).digest())
    for shard in sorted(ckpt.shards):
        st = ckpt.shards[shard].path.stat()
        h.update(f"{shard}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    return h.hexdigest()


def save(part: Path, progress: Progress) -> None:
    """Replace the record atomically; the caller has fsynced the data it describes."""
    rec = record_path(part)
    tmp = rec.with_name(rec.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump({"version": VERSION, "key": progress.key, "done": progress.done, "end": progress.end}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, rec)


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
