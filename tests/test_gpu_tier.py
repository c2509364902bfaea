"""The GPU tier's bookkeeping, without a GPU: the VRAM budget's placement and the miss split."""

from __future__ import annotations

from pathlib import Path

import pytest

from offload.expert_table import build_expert_table
from offload.gpu_placement import plan_gpu, vram_budget_for
from offload.vram_experts import CostModel, VRAMExperts
from runtime.base.config import ModelConfig
from runtime.base.errors import StepstreamError
from runtime.base.gguf_file import GGUFModelFile
from runtime.model.gpu.layout import gpu_matrices, kv_bytes, resident_layout
from runtime.model.weights import load_weights
import runtime

SHIPPED = Path(runtime.__file__).parent / "data" / "step35-mini-q4_k_m.gguf"


@pytest.fixture(scope="module")
def mini():
    f = GGUFModelFile(SHIPPED)
    cfg = ModelConfig.from_gguf(f)
    return f, cfg, load_weights(f, cfg), build_expert_table(f, cfg)


def test_resident_layout_counts_every_matrix_once_at_aligned_offsets(mini):
    f, cfg, w, _ = mini
    layout = resident_layout(w, cfg)
    mats = {id(m): m for _, m in gpu_matrices(w, cfg)}
    assert set(layout.offsets) == set(mats)
    spans = sorted((layout.offsets[k], layout.offsets[k] + mats[k].nbytes) for k in mats)
    assert all(a % 256 == 0 for a, _ in spans)
    assert all(b <= c for (_, b), (c, _) in zip(spans, spans[1:]))  # no overlap
    assert layout.matrix_bytes >= sum(m.nbytes for m in mats.values())


def test_plan_gpu_fills_slots_after_weights_and_kv(mini):
    f, cfg, w, table = mini
    n = sum(l.n_expert for l in table.layers.values())
    p = plan_gpu(cfg, w, table.total_bytes, n, 512, 16, 2**40, None)
    assert p.slots == n  # a huge budget holds every expert, and no more
    assert p.kv_bytes == kv_bytes(cfg, 512, min(cfg.window, 512) + 16)
    first = p.resident_bytes + p.kv_bytes + p.scratch_bytes
    q = plan_gpu(cfg, w, table.total_bytes, n, 512, 16, first + 5 * p.slot_bytes + 7, None)
    assert q.slots == 5
    assert "5 of" in q.text()


def test_plan_gpu_refuses_a_budget_below_the_non_expert_part_with_numbers(mini):
    f, cfg, w, table = mini
    n = sum(l.n_expert for l in table.layers.values())
    with pytest.raises(StepstreamError, match=r"needs .* before any routed expert .* budget is"):
        plan_gpu(cfg, w, table.total_bytes, n, 512, 16, "1MiB", None, "mini.gguf")
    with pytest.raises(StepstreamError, match="more than the card's"):
        plan_gpu(cfg, w, table.total_bytes, n, 512, 16, "4GiB", 2**30, "mini.gguf")
    auto = plan_gpu(cfg, w, table.total_bytes, n, 512, 16, "auto", 8 * 2**30)
    assert auto.budget_bytes == 8 * 2**30 - 2**30 and auto.slots == n


def test_vram_budget_for_holds_the_asked_share(mini):
    f, cfg, w, table = mini
    n = sum(l.n_expert for l in table.layers.values())
    b = vram_budget_for(SHIPPED, 0.25, 512)
    p = plan_gpu(cfg, w, table.total_bytes, n, 512, 16, b, None)
    assert p.slots == round(0.25 * n)


def test_cost_model_balances_copy_and_cpu_time():
    c = CostModel(copy_seconds_per_byte=1e-9, cpu_seconds_per_expert=3e-3)  # a 1 MB expert: 1 ms to copy
    assert c.copies(8, 10**6) == 6  # 6 copied (6 ms) while the CPU does 2 (6 ms)
    assert CostModel(1.0, 1e-6).copies(8, 10**6) == 0  # copying is hopeless: all on the CPU
    assert CostModel(1e-15, 1.0).copies(8, 10**6) == 8
    assert c.copies(0, 10**6) == 0


def test_vram_experts_lru_never_evicts_a_slot_in_use():
    v = VRAMExperts(2, CostModel(1e-15, 1.0))
    assert v.lookup(0, [1, 2]) == [None, None]
    s1, s2 = v.assign(0, 1, set()), v.assign(0, 2, set())
    assert {s1, s2} == {0, 1}
    assert v.lookup(0, [1]) == [s1]  # 1 is now the most recently used
    s3 = v.assign(0, 3, keep={s1})  # evicts 2, the least recently used not kept
    assert s3 == s2 and v.lookup(0, [2]) == [None]
    with pytest.raises(RuntimeError):
        v.assign(0, 4, keep={s1, s3})
    copy, cpu = v.split(0, [5, 6, 7], 10, busy=1)
    assert len(copy) == 1 and sorted(copy + cpu) == [5, 6, 7]  # one free slot's worth
    v.forget(0, 1)
    assert v.lookup(0, [1]) == [None]


def test_the_gpu_attention_scratch_is_sized_by_the_ring_not_the_files_window(tmp_path):
    """A window past the context runs as the context (llama.cpp runs such files); the GPU tier
    sized its attention scratch by the file's window (a review: 4 GB at a 256K window whatever
    -c said), where the CPU cache sizes its rings by min(window, n_ctx)."""
    from runtime.base.gguf_schema import Key
    from tests.helpers.gguf_edit import rewrite

    wide = tmp_path / "wide.gguf"
    rewrite(SHIPPED, wide, change={Key.CONTEXT_LENGTH: 4096, Key.SLIDING_WINDOW: 1_000_000})
    m = runtime.load(wide, n_ctx=64, gpu_budget="64MiB")
    try:
        assert m.cfg.window == 4096 and m.gpu.cache.window == 64
        assert m.gpu.att_slots <= 64 + 64 + 64  # the first chunk's keys, the ring, a margin
    finally:
        m.close()
