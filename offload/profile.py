"""Per-layer expert activation counts: recorded by `stepstream profile`, used to pin a hot set.

The file is small JSON: the model file's name and size (to catch a profile of another
model), the tokens seen, and for every MoE layer one count per expert.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

from runtime.base.errors import StepstreamError
from runtime.base.paths import written_path


@dataclass
class ExpertProfile:
    model: str
    model_bytes: int
    counts: dict[int, list[int]] = field(default_factory=dict)  # layer -> [E]
    tokens: int = 0

    def add(self, layer: int, n_expert: int, ids) -> None:
        """Count activations; `ids` maps expert -> (token rows, slots) for a chunk, or lists experts once each."""
        row = self.counts.setdefault(layer, [0] * n_expert)
        for e in ids:
            row[e] += len(ids[e][0]) if isinstance(ids, dict) else 1

    def hottest(self, n: int, table=None) -> list[tuple[int, int]]:
        """The n most-activated (layer, expert) pairs, most used first."""
        ranked = sorted(((c, l, e) for l, row in self.counts.items() for e, c in enumerate(row) if c > 0),
                        key=lambda t: (-t[0], t[1], t[2]))
        if table is not None:
            ranked = [t for t in ranked if t[1] in table.layers]
        return [(l, e) for _, l, e in ranked[:n]]

    def skew(self, top_fraction: float = 0.2) -> float:
        """Share of activations that go to the top `top_fraction` of each layer's experts."""
        top = total = 0
        for row in self.counts.values():
            ordered = sorted(row, reverse=True)
            k = max(1, int(round(len(row) * top_fraction)))
            top += sum(ordered[:k])
            total += sum(row)
        return top / total if total else 0.0

    def save(self, path: str | os.PathLike) -> None:
        text = json.dumps({"model": self.model, "model_bytes": self.model_bytes, "tokens": self.tokens,
                           "counts": {str(k): v for k, v in sorted(self.counts.items())}})
        write_atomically(Path(path), text.encode(), "profile")

    @classmethod
    def load(cls, path: str | os.PathLike, model_path: Path | None = None) -> "ExpertProfile":
        path = Path(path)
        try:
            if path.is_file() and _magic(path) == b"PK":  # numpy's .npz: a zip archive
                raise StepstreamError(f"{path}: a routing trace (.npz), not an expert profile: --profile takes the "
                                      f"JSON that `stepstream profile -o P.json` writes (a trace is read by "
                                      f"`stepstream plan --profile` and `python -m offload.simulate`)")
            raw = json.loads(path.read_text())
            prof = cls(raw["model"], int(raw["model_bytes"]), {int(k): [int(c) for c in v] for k, v in raw["counts"].items()},
                       int(raw.get("tokens", 0)))
        except FileNotFoundError:
            raise StepstreamError(f"{path}: profile not found (make one with `stepstream profile`)") from None
        except (ValueError, KeyError, TypeError) as e:
            raise StepstreamError(f"{path}: not a stepstream expert profile ({e})") from None
        except OSError as e:  # a directory, no permission
            raise StepstreamError(f"{path}: cannot read the profile ({e.strerror or e})") from None
        if model_path is not None and (prof.model not in model_names(model_path)
                                       or prof.model_bytes != Path(model_path).stat().st_size):
            raise StepstreamError(f"{path}: profile was recorded on {prof.model} ({prof.model_bytes} bytes), "
                                  f"not on {Path(model_path).name}")
        return prof


def model_names(model_path) -> set[str]:
    """The names a profile or trace recorded on this file may carry: the file's own (through a
    symlink, its target's, which `profile` records) and the name it was given by."""
    return {Path(model_path).name, Path(os.path.realpath(model_path)).name}


def _magic(path: Path) -> bytes:
    with path.open("rb") as f:
        return f.read(2)


def is_profile(path: Path) -> bool:
    """Whether `path` holds what `save` writes: the one kind of existing file `profile -o` replaces.
    Only a file that starts as JSON does is read whole (not a model given by mistake)."""
    try:
        with path.open("rb") as f:
            if f.read(64).lstrip()[:1] != b"{":
                return False
        ExpertProfile.load(path)
    except (OSError, StepstreamError):
        return False
    return True


def write_atomically(path: Path, data: bytes, what: str) -> None:
    """Write `data` to `.NAME.TID.part` beside `path`, synced, then rename it over `path`; the
    temporary file is removed on any error or interruption, and the old file (if any) stays whole.

    TID is the thread's native id: on Linux a PID's number space, so the process's PID in its
    main thread (the project's `.NAME.PID.part`), and unique among live threads of all
    processes: two writers never share a temporary file, and the last rename wins whole."""
    path = written_path(path)  # through a symlink: its target (the link stays)
    tmp = path.with_name(f".{path.name}.{threading.get_native_id()}.part")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise StepstreamError(f"{path}: cannot write the {what}: {e.strerror or e}") from None
    finally:
        with suppress(OSError):
            tmp.unlink(missing_ok=True)


class RecordingProvider:
    """Wraps an expert provider and counts every expert it hands out.

    With keep_calls, it also keeps each request's (layer, set of experts): one request per
    layer per token in decoding, which is what token-to-token reuse is measured on. With a
    trace (offload.trace.TraceRecorder), it records each token's experts in order.

    A `held` request that the inner provider cannot hold at once comes back as a call to
    `experts` for the same experts; that call is not counted a second time.
    """

    def __init__(self, inner, profile: ExpertProfile, n_expert: int, keep_calls: bool = False, trace=None):
        self.inner, self.profile, self.n_expert, self.trace = inner, profile, n_expert, trace
        self.calls: list[tuple[int, set[int]]] | None = [] if keep_calls else None
        self._fallback: int | None = None  # the layer whose `held` came back None

    @property
    def prefetches(self) -> bool:
        return self.inner.prefetches

    @property
    def stats(self):
        return self.inner.stats

    def _record(self, layer: int, ids) -> None:
        self.profile.add(layer, self.n_expert, ids)
        if self.calls is not None:
            self.calls.append((layer, set(int(e) for e in ids)))
        if self.trace is not None:
            self.trace.add(layer, ids)

    def experts(self, layer: int, ids, scan: bool = False) -> Iterator:
        if self._fallback == layer:
            self._fallback = None
        else:
            self._record(layer, ids)
        return self.inner.experts(layer, ids, scan=scan)

    @contextmanager
    def held(self, layer: int, ids):
        self._record(layer, ids)  # a chunk's groups (expert -> rows) count each token's use
        ids = list(ids)
        with self.inner.held(layer, ids) as got:
            self._fallback = layer if got is None else None
            try:
                yield got
            finally:
                self._fallback = None

    def prefetch(self, layer: int, ids) -> None:
        self.inner.prefetch(layer, ids)

    def descriptors(self, layer: int) -> None:
        return None  # every step's experts must reach _record

    def close(self) -> None:
        self.inner.close()
