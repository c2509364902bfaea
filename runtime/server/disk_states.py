"""The prompt cache's disk tier (serve --cache-dir DIR): conversations' KV caches as files, so
that a server started again answers a conversation's next turn without evaluating its prompt.

On the real model a Claude Code conversation's prompt is about 30,000 tokens; on a CPU its
evaluation takes minutes, its cache about 1.5 GB (f16), which NVMe reads back in a second. The
prompt cache (runtime.server.prompt_cache) writes here every conversation it keeps in RAM and,
when the server stops, the live one; it offers the files to each request beside its RAM
states, by the same score (Model.reusable).

Files are offered to this model only (its file's name, size and modification time and its
activations' rounding: state_file's identity) and to its cache layout; within `budget` bytes
for every state file in the directory, whoever wrote it (a model replaced by a new download
leaves its files to age out), the least recently used removed first. A file whose tokens begin
a newer one's (of the same model and layout) is replaced by it, once the newer one is written.
A damaged file is named in the log and removed. Writes go to a temporary name and are renamed,
so a server killed while writing leaves no half file (its temporary is removed at the next
start). One server per directory.

Files are written by a thread of their own, one at a time in the order asked: a state the prompt
cache copied into RAM goes there without the model waiting (`put_later`; on the real model a
30,000-token conversation's file took about 3 s, which every request that interrupted one used
to wait for). `put` waits for its write: a state whose arrays are views of the live cache must
be written before the next evaluation changes them. States waiting for the writer are held in
RAM; the prompt cache counts them in its budget (`pending_bytes`).
"""

from __future__ import annotations

import fcntl
import os
import sys
import threading
import time
from pathlib import Path

from runtime.base.errors import StepstreamError
from runtime.base.memory_limit import size_text
from runtime.model.kv_state import SavedState
from runtime.model.state_file import SUFFIX, StateFileError, StateOnDisk, model_identity, read_header, write


class DiskStates:
    def __init__(self, directory: Path, budget: int, model_path: Path, variant: str = ""):
        """variant: what besides the file changes the cache's values ("activations q8")."""
        self.dir, self.budget = Path(directory), budget
        self.identity = model_identity(model_path, variant)
        if self.dir.exists() and not self.dir.is_dir():
            raise StepstreamError(f"--cache-dir {self.dir}: not a directory")
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StepstreamError(f"--cache-dir {self.dir}: cannot create it: {e.strerror}") from None
        if not os.access(self.dir, os.W_OK | os.X_OK):
            raise StepstreamError(f"--cache-dir {self.dir}: not a writable directory")
        # one server per directory: a second would count only its own files, and remove the
        # first one's temporaries as leftovers
        self._lock = open(self.dir / ".lock", "a")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock.close()
            raise StepstreamError(f"--cache-dir {self.dir}: another server uses it (one server per directory)") from None
        for tmp in self.dir.glob(f".*{SUFFIX}.*.tmp"):  # left by a server killed while writing
            tmp.unlink(missing_ok=True)
        self.files: list[StateOnDisk] = []  # every state file, least recently used first
        for path in self.dir.glob(f"*{SUFFIX}"):
            if not path.is_file():
                continue
            try:
                self.files.append(StateOnDisk(path, read_header(path), path.stat().st_size))
            except StateFileError as e:
                self._say(f"{e}: removed")
                path.unlink(missing_ok=True)
        self.files.sort(key=lambda e: e.path.stat().st_mtime_ns)
        self.writes = self.reads = self.failures = 0
        self.said_too_big = False
        # The writer thread and the model's worker share `files`: bookkeeping under `_mutex`.
        # Only the writer writes files, and removes them to make room.
        self._mutex = threading.Condition(threading.RLock())
        self._queue: list[SavedState] = []  # waiting for the writer, the one it writes first
        self._writer: threading.Thread | None = None  # running while the queue holds states

    def close(self) -> None:
        """Finish the writes asked for, then let another server use the directory."""
        self.flush()
        self._lock.close()

    def put_later(self, state: SavedState) -> None:
        """Write `state` on the writer thread (its arrays must be its own: a copy, not views of
        the live cache); returns at once."""
        with self._mutex:
            if self._holds(state) or any(q.tokens == state.tokens and q.layout == state.layout for q in self._queue):
                return
            self._queue.append(state)
            if self._writer is None or not self._writer.is_alive():
                self._writer = threading.Thread(target=self._write_queued, name="stepstream-cache-dir", daemon=True)
                self._writer.start()

    def put(self, state: SavedState) -> bool:
        """Write `state` (after the writes already asked for), and wait until it is written.
        Returns whether a file holds it now (False: too big for the budget, or the write failed)."""
        self.put_later(state)
        self.flush()
        return self._holds(state)

    def flush(self) -> None:
        """Wait until every write asked for is done."""
        with self._mutex:
            while self._queue:
                self._mutex.wait()

    def pending_bytes(self, besides=()) -> int:
        """The bytes of the states waiting to be written, not counting those in `besides`."""
        with self._mutex:
            return sum(q.nbytes for q in self._queue if not any(q is b for b in besides))

    def _write_queued(self) -> None:
        """The writer thread: writes the queue's states in turn, and ends when it is empty."""
        try:
            while True:
                with self._mutex:
                    if not self._queue:
                        self._writer = None  # (under the mutex: a state queued after this starts another)
                        return
                    state = self._queue[0]
                try:
                    self._write(state)
                except Exception as e:  # (an OSError is said by _write) the next states are still written
                    self._say(f"writing a conversation failed ({type(e).__name__}: {e})")
                finally:
                    with self._mutex:
                        self._queue.pop(0)
                        self._mutex.notify_all()
        finally:  # stopped by something no handler takes: nothing may wait on it (flush)
            with self._mutex:
                if self._writer is threading.current_thread():
                    self._writer = None
                    if self._queue:
                        self._queue.clear()
                        self._say("the writer stopped; the conversations still waiting are not written")
                    self._mutex.notify_all()

    def queued(self, state: SavedState) -> bool:
        """Whether `state` waits for the writer (its memory is held until it is written)."""
        with self._mutex:
            return any(q is state for q in self._queue)

    @property
    def entries(self) -> list[StateOnDisk]:
        """This model's files."""
        return [e for e in self.files if e.header["identity"] == self.identity]

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.files)

    def usable(self, layout: tuple) -> list[StateOnDisk]:
        """The files a model with this cache layout can load."""
        with self._mutex:
            return [e for e in self.entries if e.layout == layout]

    def holds(self, state: SavedState) -> bool:
        """Whether a file of this model and layout holds these tokens, or more that begin with
        them (a conversation loaded from its file and not taken further is not written again)."""
        return self._holds(state)

    def _holds(self, state: SavedState) -> bool:
        return any(e.tokens[: len(state.tokens)] == state.tokens for e in self.usable(state.layout))

    def _write(self, state: SavedState) -> None:
        """Write `state` (room made first: nothing written that the budget cannot hold); the files
        it extends are removed once it is written. On the writer thread only."""
        with self._mutex:
            if self._holds(state):
                return
            size = state.nbytes + 64 * 1024 + 16 * len(state.tokens)  # and its header
            if size > self.budget:
                if not self.said_too_big:
                    self.said_too_big = True
                    self._say(f"a conversation of {len(state.tokens):,} tokens takes {size_text(size)}, more than "
                              f"--cache-dir-size {size_text(self.budget)}: it is not written (give a larger one)")
                return
            extended = [e for e in self.usable(state.layout) if state.tokens[: len(e.tokens)] == e.tokens]
            while self.files and self.nbytes - sum(e.nbytes for e in extended) + size > self.budget:
                victim = next(e for e in self.files if e not in extended) if len(self.files) > len(extended) else None
                if victim is None:
                    break
                self._remove(victim)
        path = self.dir / f"{time.time_ns():x}-{len(state.tokens)}{SUFFIX}"
        try:  # outside the mutex: the worker goes on choosing and loading states meanwhile
            nbytes = write(path, state, self.identity)
            written = StateOnDisk(path, read_header(path), nbytes)
        except (OSError, StateFileError) as e:
            with self._mutex:
                self.failures += 1
                if self.failures == 1:  # said once; each conversation kept later tries again
                    self._say(f"writing {path} failed ({e}); the files already written are kept")
            return
        with self._mutex:
            self.files.append(written)
            for old in extended:
                self._remove(old)
            self.writes += 1

    def get(self, entry: StateOnDisk) -> SavedState | None:
        """The state in `entry`'s file (and it becomes the most recently used), or None when the
        file is gone (the writer removed it to make room since it was offered) or damaged (then
        it is removed, and said)."""
        with self._mutex:  # (not removed by the writer while its header and CRCs are read)
            if entry not in self.files:
                return None
            try:
                state = entry.load()
            except StateFileError as e:
                self._say(f"{e}: removed")
                self._remove(entry)
                return None
            self.files.remove(entry)
            self.files.append(entry)
        try:
            os.utime(entry.path)
        except OSError:
            pass
        self.reads += 1
        return state

    def remove(self, entry: StateOnDisk) -> None:
        """Forget a file (one whose state the model refused, say) and delete it."""
        with self._mutex:
            self._remove(entry)

    def _remove(self, entry: StateOnDisk) -> None:
        if entry in self.files:
            self.files.remove(entry)
        entry.path.unlink(missing_ok=True)

    @staticmethod
    def _say(text: str) -> None:
        try:
            print(f"prompt cache: {text}", file=sys.stderr, flush=True)
        except (OSError, ValueError):  # a full disk often holds the log too: the writer must go on
            pass

    def describe(self) -> str:
        with self._mutex:
            return self._describe()

    def _describe(self) -> str:
        mine, others = len(self.entries), len(self.files) - len(self.entries)
        return (f"{mine} conversation{'s' * (mine != 1)} on disk in {self.dir}"
                + (f" (and {others} of another model or run)" if others else "")
                + f", {size_text(self.nbytes)} of {size_text(self.budget)}")
