"""Routing traces: which experts every token chose in every MoE layer, in order.

`stepstream profile --trace FILE` records one; `python -m offload.simulate` replays it
against cache policies. Counts (offload.profile) say which experts are hot; only the
order says what a cache of a given size would have held when each was asked for.

The file is a numpy .npz (written under a temporary name, then renamed):
    ids         int16 [T, L, K]  expert ids, token-major (the order decoding asks for them)
    layers      int32 [L]        the block index of each MoE layer
    n_expert    int32 [L]        routed experts of each MoE layer
    starts      int64 [P]        the first token of each prompt
    model       str              the model file's name
    model_bytes int64            its size, to tell traces of different files apart

Shape legend:  T tokens  L MoE layers  K experts per token  P prompts
"""

from __future__ import annotations

import io
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from offload.profile import model_names, write_atomically
from runtime.base.errors import StepstreamError

_FIELDS = ("ids", "layers", "n_expert", "starts", "model", "model_bytes")


@dataclass(frozen=True)
class RoutingTrace:
    ids: np.ndarray  # [T, L, K] int16
    layers: np.ndarray  # [L] int32
    n_expert: np.ndarray  # [L] int32
    starts: np.ndarray  # [P] int64
    model: str
    model_bytes: int

    def __post_init__(self):
        T, L, K = self.ids.shape if self.ids.ndim == 3 else (None, None, None)
        if T is None or self.layers.shape != (L,) or self.n_expert.shape != (L,):
            raise StepstreamError(f"routing trace of {self.model}: ids {list(self.ids.shape)}, layers "
                                  f"{list(self.layers.shape)}, n_expert {list(self.n_expert.shape)} do not agree "
                                  "(expected [T, L, K], [L], [L])")
        if L and T and (self.ids.min() < 0 or (self.ids >= self.n_expert[None, :, None]).any()):
            raise StepstreamError(f"routing trace of {self.model}: an expert id lies outside 0..n_expert-1 of its layer")
        if L and T and K > 1:  # a router picks K different experts; a repeat would be replayed as a hit
            same = np.diff(np.sort(self.ids, axis=2), axis=2) == 0  # [T, L, K-1]
            if same.any():
                t, j, _ = np.argwhere(same)[0]
                raise StepstreamError(f"routing trace of {self.model}: token {t} names expert "
                                      f"{int(np.sort(self.ids[t, j])[np.flatnonzero(same[t, j])[0]])} twice in MoE "
                                      f"layer {int(self.layers[j])}; a token's {K} experts are all different")

    @property
    def tokens(self) -> int:
        return self.ids.shape[0]

    @property
    def top_k(self) -> int:
        return self.ids.shape[2]

    def check_model(self, path: str | os.PathLike, model_path: str | os.PathLike, n_expert: dict[int, int],
                    top_k: int) -> None:
        """Refuse a trace recorded on another file than `model_path` (its name and size, as
        ExpertProfile.load checks a profile), or whose MoE layers, experts per layer or top-k are
        not the model's {layer: n_expert} and top_k."""
        model = Path(model_path)
        if self.model not in model_names(model) or self.model_bytes != model.stat().st_size:
            raise StepstreamError(f"{path}: routing trace was recorded on {self.model} ({self.model_bytes} bytes), "
                                  f"not on {model.name}")
        mine = {int(l): int(e) for l, e in zip(self.layers, self.n_expert)}
        if mine != n_expert or self.top_k != top_k:
            raise StepstreamError(f"{path}: routing trace has {len(mine)} MoE layers {sorted(mine)} of "
                                  f"{sorted(set(mine.values()))} experts, top-{self.top_k}; {model.name} has "
                                  f"{len(n_expert)} {sorted(n_expert)} of {sorted(set(n_expert.values()))}, top-{top_k}")

    def save(self, path: str | os.PathLike) -> None:
        buf = io.BytesIO()  # np.savez on a path would append ".npz" to the temporary name
        np.savez(buf, ids=self.ids.astype(np.int16), layers=self.layers.astype(np.int32),
                 n_expert=self.n_expert.astype(np.int32), starts=self.starts.astype(np.int64),
                 model=np.array(self.model), model_bytes=np.int64(self.model_bytes))
        write_atomically(Path(path), buf.getvalue(), "routing trace")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "RoutingTrace":
        path = Path(path)
        if _is_json(path):
            raise StepstreamError(f"{path}: is a JSON expert profile (counts, for `--profile`), not a routing trace; "
                                  "record a trace with `stepstream profile -m MODEL -f PROMPTS.txt --trace T.npz`")
        try:
            with np.load(path, allow_pickle=False) as z:
                missing = [k for k in _FIELDS if k not in z.files]
                if missing:
                    raise StepstreamError(f"{path}: not a routing trace (no {', '.join(missing)}; record one with "
                                          "`stepstream profile --trace FILE`)")
                raw = {k: z[k] for k in _FIELDS}
        except FileNotFoundError:
            raise StepstreamError(f"{path}: routing trace not found (record one with `stepstream profile --trace`)") from None
        except IsADirectoryError:
            raise StepstreamError(f"{path}: is a directory, not a routing trace") from None
        except (ValueError, OSError, zipfile.BadZipFile, EOFError) as e:
            # np.load reads any file it does not know as a pickle, which allow_pickle refuses
            why = "not an .npz archive" if "pickle" in str(e) else str(e)
            raise StepstreamError(f"{path}: not a routing trace ({why}; record one with "
                                  "`stepstream profile --trace FILE`)") from None
        for name in ("ids", "layers", "n_expert", "starts"):  # integers, held exactly by the types kept
            a, kind = raw[name], raw[name].dtype.kind
            if kind not in "iu":
                raise StepstreamError(f"{path}: routing trace {name} are {a.dtype}, expected integers")
            top = {"ids": np.iinfo(np.int16).max, "starts": np.iinfo(np.int64).max}.get(name, np.iinfo(np.int32).max)
            if a.size and (a.min() < 0 or a.max() > top):
                raise StepstreamError(f"{path}: routing trace {name} hold {int(a.min() if a.min() < 0 else a.max())}, "
                                      f"outside 0..{top}")
        if raw["ids"].ndim == 3 and raw["ids"].shape[2] == 0:
            raise StepstreamError(f"{path}: routing trace names no expert per token (ids {list(raw['ids'].shape)})")
        if raw["model_bytes"].shape != () or raw["model_bytes"].dtype.kind not in "iu" or raw["model"].shape != ():
            raise StepstreamError(f"{path}: routing trace model and model_bytes must be one name and one integer, "
                                  f"got shapes {list(raw['model'].shape)} and {list(raw['model_bytes'].shape)}")
        return cls(raw["ids"].astype(np.int16), raw["layers"].astype(np.int32), raw["n_expert"].astype(np.int32),
                   raw["starts"].astype(np.int64), str(raw["model"]), int(raw["model_bytes"]))


def is_trace(path: Path) -> bool:
    """Whether `path` is an .npz holding every field `save` writes: the one kind of existing file
    `profile --trace` replaces. Only the zip's directory is read, not the arrays."""
    try:
        with open(path, "rb") as f:
            if f.read(2) != b"PK":
                return False
        with zipfile.ZipFile(path) as z:
            names = set(z.namelist())
    except (OSError, zipfile.BadZipFile):
        return False
    return all(f"{k}.npy" in names for k in _FIELDS)


def _is_json(path: Path) -> bool:
    """Whether the file starts as JSON does (an .npz starts "PK"): `stepstream profile`'s counts."""
    try:
        with open(path, "rb") as f:
            head = f.read(64).lstrip()
    except OSError:
        return False  # np.load says why
    return head[:1] in (b"{", b"[")


class TraceRecorder:
    """Collects each MoE layer's routing as the model asks its provider for experts.

    A request is either one token's ids (a decode step: `held`, or a plain list) or a chunk's
    {expert: (token rows, top-k slots)} (prefill: runtime.model.ops.group_by_expert), from
    which each token's K ids are put back in place.
    """

    def __init__(self, top_k: int):
        self.top_k = top_k
        self._rows: dict[int, list[np.ndarray]] = {}  # layer -> [[T_chunk, K]]
        self._tokens: dict[int, int] = {}
        self.starts: list[int] = []

    def start_prompt(self) -> None:
        self.starts.append(max(self._tokens.values(), default=0))

    def add(self, layer: int, ids) -> None:
        K = self.top_k
        if isinstance(ids, dict):
            T = 1 + max(int(rows.max()) for rows, _ in ids.values())
            block = np.full((T, K), -1, np.int64)
            for e, (rows, slots) in ids.items():
                block[rows, slots] = e
        else:
            block = np.asarray(list(ids), np.int64).reshape(1, -1)
        if block.shape[1] != K or (block < 0).any():
            raise StepstreamError(f"routing trace: layer {layer} was asked for {block.shape[1]} experts per token "
                                  f"or left a slot empty; the model routes {K}")
        self._rows.setdefault(layer, []).append(block)
        self._tokens[layer] = self._tokens.get(layer, 0) + block.shape[0]

    def trace(self, model: str, model_bytes: int, n_expert: dict[int, int]) -> RoutingTrace:
        """The trace so far; every MoE layer in `n_expert` must have seen the same tokens."""
        layers = sorted(n_expert)
        counts = {l: self._tokens.get(l, 0) for l in layers}
        if len(set(counts.values())) > 1:
            raise StepstreamError(f"routing trace: MoE layers saw different token counts ({counts})")
        T = counts[layers[0]] if layers else 0
        ids = np.empty((T, len(layers), self.top_k), np.int16)
        for j, l in enumerate(layers):
            if T:
                ids[:, j] = np.concatenate(self._rows[l])
        return RoutingTrace(ids, np.array(layers, np.int32), np.array([n_expert[l] for l in layers], np.int32),
                            np.array(self.starts, np.int64), model, model_bytes)
