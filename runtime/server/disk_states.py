"""The prompt cache's disk tier (serve --cache-dir DIR): conversations' KV caches as files, so
that a server started again answers a conversation's next turn without evaluating its prompt.

On the real model a Claude Code conversation's prompt is about 30,000 tokens; on a CPU its
evaluation takes minutes, its cache about 1.5 GB (f16), which NVMe reads back in a second. The
prompt cache (runtime.server.prompt_cache) writes here every conversation it keeps in RAM and,
when the server stops, the live one; it offers the files to each request beside its RAM
states, by the same score (Model.reusable).

Files are this model's only (its file's name, size and modification time: state_file's
identity) and within `budget` bytes, the least recently used removed first; a file whose
tokens begin a newer one's is replaced by it. Files of another model or cache layout in the
same directory are left alone. Writes go to a temporary name and are renamed, so a server
killed while writing leaves no half file (its temporary is removed at the next start). One
server per directory.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from runtime.base.errors import StepstreamError
from runtime.base.memory_limit import size_text
from runtime.model.kv_state import SavedState
from runtime.server.state_file import SUFFIX, StateFileError, StateOnDisk, model_identity, read_header, write


class DiskStates:
    def __init__(self, directory: Path, budget: int, model_path: Path):
        self.dir, self.budget = Path(directory), budget
        self.identity = model_identity(model_path)
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StepstreamError(f"--cache-dir {self.dir}: cannot create it: {e.strerror}") from None
        if not os.access(self.dir, os.W_OK | os.X_OK):
            raise StepstreamError(f"--cache-dir {self.dir}: not a writable directory")
        for tmp in self.dir.glob(f".*{SUFFIX}.*.tmp"):  # left by a server killed while writing
            tmp.unlink(missing_ok=True)
        self.entries: list[StateOnDisk] = []  # least recently used first
        for path in self.dir.glob(f"*{SUFFIX}"):
            try:
                header = read_header(path)
            except StateFileError as e:
                self._say(f"skipped: {e}")
                continue
            if header["identity"] == self.identity:
                self.entries.append(StateOnDisk(path, header, path.stat().st_size))
        self.entries.sort(key=lambda e: e.path.stat().st_mtime_ns)
        self.broken = False  # a write failed (the disk is full, say): no more are tried
        self.writes = self.reads = 0

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.entries)

    def usable(self, layout: tuple) -> list[StateOnDisk]:
        """The files a model with this cache layout can load."""
        return [e for e in self.entries if e.layout == layout]

    def holds(self, tokens: tuple) -> bool:
        """Whether a file holds these tokens, or more that begin with them (a conversation loaded
        from its file and not taken further is not written again)."""
        return any(e.tokens[: len(tokens)] == tokens for e in self.entries)

    def put(self, state: SavedState) -> None:
        """Write `state` (room made first; nothing written that the budget cannot hold)."""
        if self.broken or self.holds(state.tokens):
            return
        size = state.nbytes + 64 * 1024  # and its header: ~6 bytes a token
        if size > self.budget:
            return
        for old in [e for e in self.entries if state.tokens[: len(e.tokens)] == e.tokens]:  # it extends them
            self._remove(old)
        while self.entries and self.nbytes + size > self.budget:
            self._remove(self.entries[0])
        path = self.dir / f"{time.time_ns():x}-{len(state.tokens)}{SUFFIX}"
        try:
            nbytes = write(path, state, self.identity)
            self.entries.append(StateOnDisk(path, read_header(path), nbytes))
        except (OSError, StateFileError) as e:
            self.broken = True
            self._say(f"writing {path} failed ({e}); conversations are no longer written to --cache-dir")
            return
        self.writes += 1

    def get(self, entry: StateOnDisk) -> SavedState | None:
        """The state in `entry`'s file (and it becomes the most recently used), or None when the
        file is gone or damaged (then it is forgotten, and said once per file)."""
        try:
            state = entry.load()
        except StateFileError as e:
            self._say(f"{e}: removed")
            self._remove(entry)
            return None
        self.entries.remove(entry)
        self.entries.append(entry)
        try:
            os.utime(entry.path)
        except OSError:
            pass
        self.reads += 1
        return state

    def _remove(self, entry: StateOnDisk) -> None:
        if entry in self.entries:
            self.entries.remove(entry)
        entry.path.unlink(missing_ok=True)

    @staticmethod
    def _say(text: str) -> None:
        print(f"prompt cache: {text}", file=sys.stderr, flush=True)

    def describe(self) -> str:
        return (f"{len(self.entries)} conversation{'s' * (len(self.entries) != 1)} on disk in {self.dir} "
                f"({size_text(self.nbytes)} of {size_text(self.budget)})")
