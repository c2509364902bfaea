"""How much of the model the GPU takes under a VRAM budget, decided before anything is allocated.

In this order: the non-expert weights (attention, the dense and shared FFNs, quantized
routers, the output head), the KV cache at the full context and the decode buffers; then
as many routed-expert slots as the rest holds, never more than there are experts. A budget
that cannot hold the first part is refused with the numbers. "auto" is the card's free
memory less a reserve (the CUDA context, the compiled kernels, the allocator's slack).

The three tiers a run prints: VRAM (this), RAM (offload.placement's expert cache, or every
expert mapped), and the disk the rest streams from.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from offload.expert_table import build_expert_table
from runtime.base.config import ModelConfig
from runtime.base.errors import StepstreamError
from runtime.base.gguf_file import GGUFModelFile
from runtime.base.memory_limit import size_text
from runtime.base.units import parse_bytes
from runtime.model.gpu.layout import expert_slot_bytes, kv_bytes, resident_layout, scratch_bytes
from runtime.model.kv_cache import ring_window
from runtime.model.weights import ModelWeights, load_weights


def vram_reserve(free: int) -> int:
    """What "auto" leaves free: 1 GiB or 5% of the free memory, whichever is larger."""
    return max(2**30, free // 20)


@dataclass(frozen=True)
class GPUPlacement:
    budget_bytes: int
    budget_reason: str
    resident_bytes: int  # non-expert matrices and vectors
    kv_bytes: int  # the KV cache at the full context
    scratch_bytes: int
    slot_bytes: int
    slots: int  # routed experts the GPU holds
    n_experts: int
    expert_bytes: int  # every routed expert of the file

    @property
    def expert_share(self) -> float:
        return self.slots / self.n_experts if self.n_experts else 1.0

    def text(self) -> str:
        return (f"VRAM: budget {size_text(self.budget_bytes)} ({self.budget_reason}); "
                f"{size_text(self.resident_bytes)} of non-expert weights, {size_text(self.kv_bytes)} of KV cache, "
                f"{self.slots} of {self.n_experts} routed experts ({self.expert_share:.0%}, "
                f"{size_text(self.slots * self.slot_bytes)})")

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def plan_gpu(cfg: ModelConfig, weights: ModelWeights, expert_bytes: int, n_experts: int, n_ctx: int, rollback: int,
             budget: int | str, free: int | None, src: str = "") -> GPUPlacement:
    """The GPU's share under `budget` (bytes, a size text, or "auto" with `free` the card's free bytes)."""
    layout = resident_layout(weights, cfg)
    resident = layout.matrix_bytes + layout.vector_bytes
    kv = kv_bytes(cfg, n_ctx, ring_window(cfg.window, n_ctx) + rollback)
    scratch = scratch_bytes(cfg, n_ctx)
    slot = expert_slot_bytes(cfg, expert_bytes // max(n_experts, 1)) if n_experts else 0
    if budget == "auto":
        if free is None:  # a card that states no limit (numba's simulator): what the whole model takes
            total, reason = None, "auto: the card states no limit"
        else:
            total, reason = max(0, free - vram_reserve(free)), f"auto: {size_text(free)} free less a reserve"
    else:
        total, reason = parse_bytes(budget), "asked for"
        if free is not None and total > free:
            raise StepstreamError(f"{src}: a GPU budget of {size_text(total)} is more than the card's "
                                  f"{size_text(free)} of free memory")
    first = resident + kv + scratch
    if total is None:
        total = first + n_experts * slot
    if first > total:
        raise StepstreamError(
            f"{src}: the GPU tier needs {size_text(first)} before any routed expert ({size_text(resident)} of "
            f"non-expert weights, {size_text(kv)} of KV cache at {n_ctx} positions, {size_text(scratch)} of "
            f"buffers) but the budget is {size_text(total)} ({reason}); give a larger --gpu-budget or a "
            f"smaller context")
    slots = min(n_experts, (total - first) // slot) if slot else 0
    return GPUPlacement(total, reason, resident, kv, scratch, slot, int(slots), n_experts, expert_bytes)


def vram_budget_for(path: str | Path, expert_fraction: float, n_ctx: int, rollback: int = 16) -> int:
    """The budget that holds the non-expert weights, the KV cache at n_ctx and `expert_fraction`
    of the routed experts: what a benchmark passes as gpu_budget to force all three tiers."""
    if not 0.0 <= expert_fraction <= 1.0:
        raise StepstreamError(f"expert_fraction={expert_fraction} must be within [0, 1]")
    f = GGUFModelFile(path)
    cfg = ModelConfig.from_gguf(f)
    table = build_expert_table(f, cfg)
    n_experts = sum(l.n_expert for l in table.layers.values())
    p = plan_gpu(cfg, load_weights(f, cfg), table.total_bytes, n_experts, n_ctx, rollback, 2**62, None)
    return p.resident_bytes + p.kv_bytes + p.scratch_bytes + int(round(expert_fraction * n_experts)) * p.slot_bytes
