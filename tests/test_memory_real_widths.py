"""The default RAM budget under a real cgroup-v1 cap, on a file at the real model's widths (hidden
4096, vocabulary 128,896, experts of 8.45 MiB). A user review found `run` OOM-killed (exit 137)
with no --ram-budget in 1.5 and 2 GiB caps: the budget left 80 MiB for the runtime, which at
these widths holds ~95 MiB of tokenizer, prefill activations that grow with the hidden width,
and (before the fix) a long prompt's [T, hidden] states twice over."""

from __future__ import annotations

import subprocess
import sys
import tracemalloc
from pathlib import Path

import pytest

import runtime
from runtime.base.cgroup import CgroupUnavailable, MemoryCap, drop_page_cache

ROOT = Path(runtime.__file__).resolve().parent.parent
MiB = 2**20


@pytest.mark.slow
def test_the_default_budget_runs_a_long_prompt_under_a_cgroup_cap_at_real_widths(tmp_path):
    model = tmp_path / "wide.gguf"
    subprocess.run([sys.executable, "-m", "runtime.cli", "synth", str(model), "--moe-layers", "1", "--experts", "64",
                    "--quiet"], check=True, timeout=300, cwd=ROOT)
    prompt = tmp_path / "prompt.txt"
    prompt.write_text(" ".join(["the quick brown fox jumps over the lazy dog"] * 14))  # ~700 tokens here
    cap = 1200 * MiB  # the file is 1.15 GB: 600 MiB resident, 540 MiB of experts
    drop_page_cache(model)
    try:
        with MemoryCap(cap) as group:
            r = group.run([sys.executable, "-m", "runtime.cli", "run", "-m", str(model), "-f", str(prompt), "-n", "4",
                           "-t", "1", "--temp", "0"], capture_output=True, text=True, timeout=900, cwd=ROOT)
            peak = group.max_usage
    except CgroupUnavailable as e:
        pytest.skip(f"no memory cgroup for a RAM cap here: {e}")
    assert r.returncode == 0, f"exit {r.returncode}: {r.stderr[-2000:]}"
    assert "placement: budget" in r.stderr and "cgroup v1 limit" in r.stderr  # it streamed, budget from the cap
    assert peak <= cap


def _traced_peak(f):
    tracemalloc.start()
    try:
        out = f()
        return out, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_a_long_prompt_is_evaluated_without_holding_every_hidden_state():
    """eval kept each chunk's [n_batch, hidden] states and concatenated them: 2 x 16 KiB a token
    at hidden 4096 (86 MB for a 2,640-token prompt), for logits that need the last row only."""
    m = runtime.load(ROOT / "runtime" / "data" / "step35-mini-q4_k_m.gguf", n_ctx=4096, n_batch=16, n_threads=1,
                     experts="ram", mtp=0)
    ids = [5 + i % 1000 for i in range(4000)]
    m.eval(ids)  # kernels loaded, buffers made, the KV cache grown to the prompt
    m.reset()
    h, held = _traced_peak(lambda: m.hidden(ids))  # every row, by design
    m.reset()
    got, peak = _traced_peak(lambda: m.eval(ids))
    assert (got == m.output(h[-1:])[0]).all()
    rows = h.nbytes  # one float32 [T, hidden] array: 4 MB
    assert peak < held - rows, f"eval's peak {peak} bytes, hidden's {held}, the rows {rows}"
