"""Where every routed expert lives on disk: one extent per matrix (gate, up, down).

GGUF stores each MoE layer's experts as three 3-D tensors whose slices are contiguous
per expert, so expert e of layer l is three byte ranges, possibly in different parts of a
split file. The table is built from tensor headers alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gguf

from runtime.base.config import ModelConfig
from runtime.base.errors import StepstreamError
from runtime.base.gguf_file import GGUFModelFile
from runtime.base.gguf_schema import EXPERTS, blk


@dataclass(frozen=True)
class Extent:
    path: Path
    offset: int  # absolute byte offset in `path`
    nbytes: int


@dataclass(frozen=True)
class LayerExperts:
    """The three expert tensors of one MoE layer."""

    layer: int
    n_expert: int
    qtypes: tuple[gguf.GGMLQuantizationType, ...]  # gate, up, down
    shapes: tuple[tuple[int, int], ...]  # per-expert matrix shape [N, C] of gate, up, down
    paths: tuple[Path, ...]
    offsets: tuple[int, ...]  # start of each 3-D tensor
    strides: tuple[int, ...]  # bytes per expert slice of each tensor

    @property
    def expert_bytes(self) -> int:
        return sum(self.strides)

    def extents(self, e: int) -> tuple[Extent, Extent, Extent]:
        if not 0 <= e < self.n_expert:
            raise IndexError(f"expert {e} outside 0..{self.n_expert - 1} of layer {self.layer}")
        return tuple(Extent(p, o + e * s, s) for p, o, s in zip(self.paths, self.offsets, self.strides))


@dataclass(frozen=True)
class ExpertTable:
    layers: dict[int, LayerExperts]

    @property
    def total_bytes(self) -> int:
        return sum(l.expert_bytes * l.n_expert for l in self.layers.values())

    @property
    def max_expert_bytes(self) -> int:
        return max(l.expert_bytes for l in self.layers.values())

    def extents(self, layer: int, e: int) -> tuple[Extent, Extent, Extent]:
        return self.layers[layer].extents(e)


def build_expert_table(f: GGUFModelFile, cfg: ModelConfig) -> ExpertTable:
    layers = {}
    for i in range(cfg.n_layers):
        if not cfg.moe[i]:
            continue
        refs = [f.tensor(blk(i, name)) for name in EXPERTS]
        E = cfg.n_expert
        shapes, strides = [], []
        for ref in refs:
            if len(ref.shape) != 3 or ref.shape[0] != E:
                raise StepstreamError(f"{ref.path}: tensor {ref.name!r} has shape {list(ref.shape)}, expected [{E}, N, C]")
            nbytes = int(ref.data.nbytes)
            if nbytes % E:
                raise StepstreamError(f"{ref.path}: tensor {ref.name!r} holds {nbytes} bytes, not a multiple of {E} experts")
            shapes.append((int(ref.shape[1]), int(ref.shape[2])))
            strides.append(nbytes // E)
        layers[i] = LayerExperts(i, E, tuple(r.qtype for r in refs), tuple(shapes), tuple(r.path for r in refs),
                                 tuple(r.offset for r in refs), tuple(strides))
    if not layers:
        raise StepstreamError(f"{f.path}: the model has no MoE layers to stream")
    return ExpertTable(layers)
