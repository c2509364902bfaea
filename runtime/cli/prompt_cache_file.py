"""`run --prompt-cache FILE` (llama-cli's flag): the KV cache of a run kept in a file, so that the
next run of the same prompt, or of one that begins with it, evaluates only what is new.

On the real model a long prompt (a document, a code base, a long system prompt) takes minutes to
evaluate on a CPU; its KV cache reads back from NVMe in seconds. The file is the server's state
format (runtime.model.state_file: a checked JSON header, each array with its CRC-32, written to
a temporary name and renamed). It holds the prompt and the text generated after it, with the
sliding-window rings' checkpoint at the prompt's end, so a next prompt that shares the prompt
but not the generated text reuses the prompt.

A file of another model, or of this one run another way (the activations' rounding, the GPU
tier, the cache's types), or a damaged one, is said in one line and replaced by this run's. A
path that holds anything but a state file (the model itself, given by mistake) is refused
before the model loads, and never written over.
"""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

from runtime.base.errors import StepstreamError
from runtime.base.memory_limit import size_text
from runtime.model.kv_state import StateMismatch
from runtime.model.state_file import (MAGIC, StateFileError, model_identity, read_header, read_state, variant,
                                      write)


_NAME = MAGIC[:14]  # the format's name; the two bytes after it are its version


def state_variant(args) -> str:
    """What besides the model file changes a saved state's values (serve --cache-dir's files and
    run --prompt-cache's), from the flags: the same as the loaded model's (Model.state_variant)."""
    return variant(args.activations, args.gpu_budget is not None)


class PromptCacheFile:
    def __init__(self, path: str, model_path: str, variant: str, read_only: bool = False):
        """Checks the path before the model loads: a state file or nothing, in a directory this
        run can write to (unless read_only)."""
        self.path, self.read_only = Path(path), read_only
        self.identity = model_identity(Path(model_path), variant)
        flag = "--prompt-cache"
        self.target = self.path
        try:
            # a link is followed: the file it names is the one read and replaced
            self.target = Path(os.path.realpath(self.path))
            st = os.stat(self.target)
        except FileNotFoundError:
            st = None
        except OSError as e:  # a name too long, a directory on the way this user cannot search
            raise StepstreamError(f"{flag} {self.path}: {e.strerror}") from None
        if st is not None and stat.S_ISDIR(st.st_mode):
            raise StepstreamError(f"{flag} {self.path}: a directory, not a file")
        if st is not None and not stat.S_ISREG(st.st_mode):  # a FIFO blocked the read; a device was replaced
            raise StepstreamError(f"{flag} {self.path}: not a regular file; it is left as it is")
        if st is not None:
            try:
                with open(self.target, "rb") as f:
                    head = f.read(len(_NAME))
            except OSError as e:
                raise StepstreamError(f"{flag} {self.path}: cannot read it: {e.strerror}") from None
            # (an empty file, or one cut short in its magic, is replaced; one of another format
            # version is said to be so by read_header, and replaced)
            if head != _NAME[: len(head)]:
                raise StepstreamError(f"{flag} {self.path}: not a stepstream prompt-cache file; it is left as it is "
                                      f"(give a new path, or remove the file)")
        elif read_only:
            raise StepstreamError(f"{flag} {self.path}: no such file (--prompt-cache-ro only reads one)")
        where = self.target.parent
        if not read_only and not (where.is_dir() and os.access(where, os.W_OK | os.X_OK)):
            raise StepstreamError(f"{flag} {self.path}: cannot write in {where} (no such directory, or not writable)")
        self.loaded = 0  # the tokens the file held

    def load_into(self, model) -> None:
        """Load the file's state into the model when it is this model's, run this way; else say why not."""
        if not self.target.exists():
            return
        try:
            header = read_header(self.target)
            if header["identity"] != self.identity:
                raise StateMismatch(f"saved by another model or run ({header['identity']}; this run is {self.identity})")
            state = read_state(self.target, header)
            model.load_state(state)  # (one it refuses, of another cache layout say, leaves the cache as it was)
        except (StateFileError, StateMismatch) as e:
            why = str(e) if isinstance(e, StateFileError) else f"{self.path}: {e}"  # (a StateFileError names it)
            print(f"prompt cache: {why}; the prompt is evaluated from the start"
                  + ("" if self.read_only else " and the file replaced"), file=sys.stderr, flush=True)
            return
        self.loaded = len(state.tokens)

    def save(self, model) -> None:
        """Write what the model's cache holds (atomically), unless read-only or empty."""
        if self.read_only or model.n_past == 0:
            return
        try:
            nbytes = write(self.target, model.save_state(checkpoint=True, copy=False), self.identity)
        except OSError as e:
            raise StepstreamError(f"--prompt-cache {self.path}: writing it failed: {e.strerror or e}; "
                                  "the file as it was is kept") from None
        print(f"prompt cache: {model.n_past:,} tokens saved to {self.path} ({size_text(nbytes)})", file=sys.stderr)
