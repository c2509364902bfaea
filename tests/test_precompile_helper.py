"""When a first run's compile helper starts (runtime.model.precompile): only with a core to
spare. Where other processes keep the other cores busy, a helper would make three processes
share two cores, slowing the warm-up and their work alike.

References: a real spinning process for the measurement; the helper's own start (Popen) for
the decision."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import numpy as np
import pytest

from runtime.base import system
from runtime.model import precompile


class _Popen:
    """Records the helper's command instead of starting it."""

    started: list = []

    def __init__(self, argv, **kwargs):
        _Popen.started.append(argv)

    def poll(self):
        return 0


@pytest.fixture
def started(monkeypatch):
    _Popen.started = []
    monkeypatch.setattr(precompile.subprocess, "Popen", _Popen)
    return _Popen.started


@pytest.mark.parametrize("idle, starts", [(1.0, True), (0.5, True), (0.3, False), (0.0, False)])
def test_the_helper_starts_only_with_half_a_core_idle(monkeypatch, started, idle, starts):
    probes = []
    monkeypatch.setattr(precompile, "idle_cores", lambda seconds: probes.append(seconds) or idle)
    helper = precompile._Helper({"formats": 3}, useful=True)
    for _ in range(3):  # three compile events: one probe, at most one helper
        helper.on_start(None)
    assert probes == [precompile.IDLE_PROBE_S]
    assert len(started) == (1 if starts else 0)
    assert helper.useful == starts
    if starts:
        assert started[0][1:3] == ["-m", "runtime.model.precompile"]


@pytest.mark.parametrize("switch, useful", [(None, True), ("1", True), ("0", False)])
def test_the_switch_turns_the_helper_off(monkeypatch, started, switch, useful):
    """STEPSTREAM_COMPILE_HELPER=0 (the suite's conftest sets it) keeps the helper from starting
    at a real compile; unset or 1, a 2-core CPU run starts it."""
    from types import SimpleNamespace

    import numba

    if switch is None:
        monkeypatch.delenv(precompile.SWITCH, raising=False)
    else:
        monkeypatch.setenv(precompile.SWITCH, switch)
    monkeypatch.setattr(precompile, "_cores", lambda: 2)
    monkeypatch.setattr(precompile, "idle_cores", lambda seconds: 2.0)
    model = SimpleNamespace(gpu=None, int8=3, options=SimpleNamespace(kv_types=("f16", "f16")),
                            cfg=SimpleNamespace(head_dim=128, hidden=256))
    with precompile.alongside(model) as helper:
        numba.njit(lambda x: x + 1)(np.int64(switch == "0"))  # a compile event (a fresh function)
    assert helper.useful == useful
    assert len(started) == (1 if useful else 0)


def test_no_probe_where_the_helper_is_not_useful(monkeypatch, started):
    """One core, the GPU tier or a warm cache: no measurement, no helper."""
    monkeypatch.setattr(precompile, "idle_cores", lambda seconds: pytest.fail("probed"))
    helper = precompile._Helper({"formats": 3}, useful=False)
    helper.on_start(None)
    assert started == []


_MEASURE = """
import os, sys
os.sched_setaffinity(0, {int(sys.argv[1])})
from runtime.base.system import idle_cores
print(idle_cores(0.5))
"""


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs CPU affinity (Linux)")
def test_a_core_a_spinning_process_holds_is_not_idle():
    """A process confined to one core, beside a process spinning on that core, finds less than
    half a core idle: the real measurement, over the cores this process may use."""
    cpu = sorted(os.sched_getaffinity(0))[0]
    spin = subprocess.Popen([sys.executable, "-c", f"import os\nos.sched_setaffinity(0, {{{cpu}}})\nwhile True: pass"])
    try:
        time.sleep(0.3)  # the spinner under way
        r = subprocess.run([sys.executable, "-c", _MEASURE, str(cpu)], capture_output=True, text=True, timeout=120)
    finally:
        spin.kill()
        spin.wait()
    assert r.returncode == 0, r.stderr
    idle = float(r.stdout.strip().splitlines()[-1])
    assert 0.0 <= idle < precompile.MIN_IDLE_CORES, idle


def test_idle_cores_counts_the_cores_of_this_process_only():
    idle = system.idle_cores(0.1)
    assert 0.0 <= idle <= len(os.sched_getaffinity(0)) + 1e-6


_PARENT = """
import json, sys, time
from runtime.model import precompile
precompile.idle_cores = lambda seconds: 2.0  # start it whatever the machine is doing
h = precompile._Helper({"formats": 3, "kv_types": ["f16", "f16"], "head_dim": 128, "hidden": 256}, useful=True)
h.on_start(None)
print(h.proc.pid, flush=True)
time.sleep(120)
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"  # a zombie has ended
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux's parent-death signal")
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGKILL"])
def test_the_helper_ends_with_the_process_that_started_it(tmp_path, sig):
    """A first run stopped while its helper compiles (SIGTERM from `kill` or a job's limit, or
    SIGKILL) must not leave the helper compiling on its own (a review found it running 50 s
    more); the helper compiles into an empty cache here, so it would run for tens of seconds."""
    import signal as signals

    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path)}
    parent = subprocess.Popen([sys.executable, "-c", _PARENT], stdout=subprocess.PIPE, text=True, env=env)
    try:
        helper = int(parent.stdout.readline())
        time.sleep(1.0)
        assert _alive(helper)  # compiling
        parent.send_signal(getattr(signals, sig))
        parent.wait(30)
        deadline = time.monotonic() + 20
        while _alive(helper) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(helper)
    finally:
        parent.kill()
        parent.wait()
