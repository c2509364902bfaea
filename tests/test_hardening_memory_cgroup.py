"""`stepstream run` with default options under real cgroup-v1 memory caps.

Each cap is set from what an interpreter with the runtime imported already uses inside a
cap, measured first, so the tests hold whether or not the shared libraries' pages are
charged to the group. The refusals use the tiny miniature; streaming under a cap uses one
made here with more experts (64, top-8, ~45 MB at q8_0), so that the window between
"the smallest cache fits" and "the mapped file fits" is wide.
"""

from __future__ import annotations

import os
import sys
import textwrap
from pathlib import Path

import pytest

from runtime.base.cgroup import CgroupUnavailable, MemoryCap, drop_page_cache
from runtime.base.memory_limit import size_text
from runtime.cli import main

MiB = 2**20
ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "NUMBA_NUM_THREADS": "2"}
PROMPT = ["-p", "def f(x):", "-n", "4", "--temp", "0", "-t", "2"]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    from convert import mini
    from convert.converter import convert

    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(mini.PRESETS, "memtest", mini.Preset(256, 4, 128, 2, 4, 1, 64, 8, 256, 256, 512, 700, 16, 2,
                                                       "memory-limit tests: ~45 MB at q8_0"))
        ckpt = mini.write_mini(tmp_path_factory.mktemp("ckpt") / "memtest", "memtest", seed=3)
    path = tmp_path_factory.mktemp("gguf") / "memtest-q8_0.gguf"
    convert(ckpt, path, "q8_0", progress=False)
    return path


def capped(cap: int, args: list[str], model: Path):
    """Run `python -m <args>` inside a fresh cgroup-v1 cap; (result, group name, OOM kills)."""
    drop_page_cache(model)
    try:
        with MemoryCap(cap) as group:
            r = group.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=600, env=ENV,
                          cwd=ROOT)
            return r, group.path.name, group.oom_kills
    except CgroupUnavailable as e:
        pytest.skip(f"no memory cgroup for a RAM cap here: {e}")


BASELINE = textwrap.dedent("""
    import runtime.loader, runtime.cli.run
    from runtime.base import system
    lim = system.memory_limit()
    print(lim.kind, lim.used)
""")


@pytest.fixture(scope="module")
def used_before_loading(tmp_path_factory) -> int:
    """What the runtime, imported, already uses inside a cap (the group's working set)."""
    path = tmp_path_factory.mktemp("baseline") / "baseline.py"
    path.write_text(BASELINE)
    try:
        with MemoryCap(1024 * MiB) as group:
            r = group.run([sys.executable, str(path)], capture_output=True, text=True, timeout=300, env=ENV, cwd=ROOT)
    except CgroupUnavailable as e:
        pytest.skip(f"no memory cgroup for a RAM cap here: {e}")
    assert r.returncode == 0, r.stderr
    kind, _version, used = r.stdout.split()
    assert kind == "cgroup", r.stdout  # "cgroup v1 <used>": the cap binds, not the host
    return int(used)


def sizes(model: Path, used: int) -> dict:
    from tests.test_hardening_memory_limits import _sizes

    size, resident, runtime, smallest = _sizes(model)
    return {"used": used, "size": size, "resident": resident, "runtime": runtime, "smallest": smallest}


@pytest.mark.slow
def test_default_options_stream_under_a_cap_and_name_it(model, used_before_loading, capsys, tmp_path):
    s = sizes(model, used_before_loading)
    experts = s["size"] - s["resident"]
    # Room beside the runtime for the smallest cache and half the experts: the mapped file does not fit.
    cap = s["used"] + s["resident"] + s["runtime"].full + s["smallest"] + experts // 2
    assert main(["run", "-m", str(model), *PROMPT]) == 0  # uncapped: experts in RAM; compiles the kernels
    uncapped = capsys.readouterr()
    assert "placement:" not in uncapped.err
    r, name, oom = capped(cap, ["runtime.cli", "run", "-m", str(model), *PROMPT], model)
    print(f"\ncap {size_text(cap)} ({size_text(s['used'])} used before loading), "
          f"file {size_text(s['size'])}:\n{r.stderr}")
    assert r.returncode == 0 and oom == 0, r.stderr[-2000:]
    placement = next(l for l in r.stderr.splitlines() if l.startswith("placement: "))
    assert f"(cgroup v1 limit /{name}: {size_text(cap)}, " in placement
    assert r.stdout == uncapped.out  # streaming gives the same greedy text
    # a long prompt under the same cap, the MTP heads drafting (the default): a review had it
    # OOM-killed, the heads holding a whole prompt's activations and the warm-up's kernels
    # beyond what the placement counted
    prompt = tmp_path / "long.txt"
    prompt.write_text(Path(textwrap.__file__).read_text(encoding="utf-8")[:5000], encoding="utf-8")
    r, name, oom = capped(cap, ["runtime.cli", "run", "-m", str(model), "-f", str(prompt), "-n", "8", "--temp", "0",
                                "-t", "2", "--stats"], model)
    assert r.returncode == 0 and oom == 0, r.stderr[-2000:]
    n_prompt = int(next(l for l in r.stderr.splitlines() if l.startswith("[length]")).split()[1])
    assert n_prompt > 1500, r.stderr[-500:]


def test_refused_with_one_line_when_the_cap_is_below_what_streaming_needs(tiny_gguf, used_before_loading):
    model = tiny_gguf("q4_k_m")
    s = sizes(model, used_before_loading)
    need = s["resident"] + s["runtime"].start + s["smallest"]
    cap = s["used"] + need - 6 * MiB  # short of the need, above what the interpreter holds
    r, name, oom = capped(cap, ["runtime.cli", "run", "-m", str(model), *PROMPT], model)
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert r.returncode == 2 and oom == 0, r.stderr[-2000:]
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"error: {model.name}: streaming needs {size_text(need)} (")
    assert f"but the cgroup v1 limit /{name}: {size_text(cap)}, " in lines[0]


def test_an_asked_budget_larger_than_the_cap_allows_is_refused(tiny_gguf, used_before_loading):
    """Measured before: under a 400 MiB cap, --ram-budget 100MiB beside 372 MB of resident
    weights was OOM-killed (exit 137) without a word."""
    model = tiny_gguf("q4_k_m")
    s = sizes(model, used_before_loading)
    cap = s["used"] + s["resident"] + s["runtime"].start + 3 * MiB
    r, name, oom = capped(cap, ["runtime.cli", "run", "-m", str(model), *PROMPT, "--ram-budget", "5MiB"], model)
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert r.returncode == 2 and oom == 0, r.stderr[-2000:]
    assert len(lines) == 1, lines
    assert f"a RAM budget of 5.0 MiB needs {size_text(s['resident'] + s['runtime'].start + 5 * MiB)} with " in lines[0]
    assert f"but the cgroup v1 limit /{name}: {size_text(cap)}, " in lines[0]
    assert "the largest budget that fits is" in lines[0] or "not even the smallest expert cache" in lines[0]
