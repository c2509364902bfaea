"""Where each part of the model lives when routed experts stream from disk.

Everything that is not a routed expert is copied into RAM once (attention, norms, router,
shared experts, dense layers, the output head), so it never competes with the experts
for page cache; embedding rows stay memory-mapped and are read on demand. Routed
experts live in the expert cache, whose size is the RAM budget. The default budget is
the memory available now minus a reserve, and never more than all the experts.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from offload.cache import ExpertCache
from offload.direct_io import DirectReader
from offload.expert_table import ExpertTable, build_expert_table
from offload.profile import ExpertProfile
from offload.provider import StreamingExperts, slot_bytes_for
from runtime.base.config import ModelConfig
from runtime.base import system
from runtime.base.units import parse_bytes
from runtime.base.gguf_file import GGUFModelFile
from runtime.model.matrix import Matrix, make_matrix

def default_budget(expert_bytes: int, resident_bytes: int) -> int:
    return max(0, min(expert_bytes, system.usable_memory() - resident_bytes))


def make_resident(weights, n_trunk: int, skip: tuple[str, ...] = ("embed", "nextn")):
    """A copy of the weights tree whose matrices live in RAM instead of the file map; (tree, bytes).

    Top-level fields named in `skip` stay mapped, and so do the MTP blocks (blocks past
    `n_trunk`): plain decoding never touches them. A matrix shared by several parts (a
    tied or shared head) is copied once.
    """
    copies: dict[int, Matrix] = {}
    total = 0

    def walk(node):
        nonlocal total
        if isinstance(node, Matrix):
            if id(node) not in copies:
                data = np.array(node.data)  # the kernels' packed view is rebuilt over the copy
                total += data.nbytes
                copies[id(node)] = make_matrix(node.name, node.qtype, node.shape, data)
            return copies[id(node)]
        if isinstance(node, list):
            return [walk(v) for v in node]
        if dataclasses.is_dataclass(node):
            return dataclasses.replace(node, **{f.name: walk(getattr(node, f.name)) for f in dataclasses.fields(node)})
        if isinstance(node, np.ndarray):
            total += node.nbytes
        return node

    top = {f.name: (getattr(weights, f.name) if f.name in skip else walk(getattr(weights, f.name)))
           for f in dataclasses.fields(weights) if f.name != "blocks"}
    top["blocks"] = [walk(b) for b in weights.blocks[:n_trunk]] + list(weights.blocks[n_trunk:])
    return dataclasses.replace(weights, **top), total


@dataclass(frozen=True)
class Placement:
    resident_bytes: int  # non-expert weights copied to RAM
    cache_bytes: int  # the expert cache's arena
    slot_bytes: int
    cache_slots: int
    pinned: int
    n_experts: int
    expert_bytes: int  # all routed experts in the file
    policy: str

    def text(self) -> str:
        return (f"placement: {self.resident_bytes / 2**20:.1f} MiB resident (attention, shared experts, dense, head); "
                f"expert cache {self.cache_bytes / 2**20:.1f} MiB = {self.cache_slots} of {self.n_experts} experts "
                f"({self.cache_bytes / self.expert_bytes:.0%} of {self.expert_bytes / 2**20:.1f} MiB), policy {self.policy}"
                + (f", {self.pinned} pinned from the profile" if self.pinned else ""))

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def build_streaming(f: GGUFModelFile, cfg: ModelConfig, resident_bytes: int, budget: int | str | None,
                    policy: str = "lru", profile: str | None = None, pin_share: float = 0.5,
                    direct_io: bool = True, workers: int = 4) -> tuple[StreamingExperts, Placement]:
    f.release_pages()
    table: ExpertTable = build_expert_table(f, cfg)
    slot = slot_bytes_for(table)
    budget_bytes = default_budget(table.total_bytes, resident_bytes) if budget is None else parse_bytes(budget)
    n_experts = sum(l.n_expert for l in table.layers.values())
    # Keep no more slots than there are experts: a larger budget buys nothing.
    budget_bytes = min(budget_bytes, slot * n_experts)
    if profile is not None and policy == "lru":
        policy = "pinned"
    cache = ExpertCache(budget_bytes, slot, policy, min_slots=cfg.n_expert_used)
    # Prefetch the 3/4 most likely of one token's K experts: the last guesses are the ones
    # most often wrong, and each wrong guess is an expert read for nothing.
    provider = StreamingExperts(table, cache, DirectReader(direct_io), workers=workers,
                                prefetch_depth=max(1, cfg.n_expert_used * 3 // 4))
    pinned = 0
    if profile is not None:
        hot = ExpertProfile.load(profile, f.path).hottest(int(cache.n_slots * pin_share), table)
        pinned = provider.pin(hot)
    placement = Placement(resident_bytes, cache.capacity_bytes, slot, cache.n_slots, pinned, n_experts,
                          table.total_bytes, cache.policy)
    return provider, placement
