"""A first run's kernels compiled in two processes: a helper compiles the heaviest ones while the
warm-up compiles the rest.

Numba compiles on one thread, and a first run's warm-up compiles a few dozen kernels in the
order the model calls them (about 25 s of a 30 s wait on a 2-core machine). When the warm-up's
first compile shows that the cache is cold, `alongside` starts `python -m
runtime.model.precompile`, which compiles into the same cache the kernels the warm-up comes to
last first: the fused SwiGLU sum of a decode step, the decode attention, the GEMV, then a
prefill chunk's fused experts, the prefill GEMM (with its VNNI steps), the chunk attention and
the router, calling each on empty inputs of the types the model passes, while the warm-up runs
its prefill chunk and then its decode step. The two processes meet in the middle: a kernel the
warm-up needs before the helper has cached it, the warm-up compiles itself, and at most the
kernel they meet at is compiled twice. (The helper used to go in the warm-up's own order, and
both processes compiled the chunk attention, then the decode attention: the shipped model's
cold demo waited 37.9 s for its first token, against 31.1 s in this order: medians of 4 and
7 runs of `python -m runtime.bench.cold_start` on a 2-core machine at load 1.1-1.9.) The helper is stopped when
the warm-up ends. Nothing depends on it: if it fails or is slow, the warm-up compiles what it
lacks itself, and the numbers are the same either way (the cached code is the same code).

The helper runs only where it can help: on a cold cache, with two or more cores, on the CPU path,
unless STEPSTREAM_COMPILE_HELPER=0 (the test suite sets it: its tests would compile the
kernels of code paths they never reach), and when the first compile finds half a core or more idle (measured over 0.2 s, the warm-up's own
compile counting as busy). Where other processes keep the other cores busy, a helper would make
three processes share two cores: the warm-up would run at two thirds of a core while the helper
compiled part of its work, about as slow as compiling alone, and the others' work would lose a
third of a core (the test suite's parallel workers are such a case).
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
from contextlib import contextmanager

import numpy as np
from numba.core import event

from runtime.base.child import child_env
from runtime.base.system import idle_cores

HELPER_TIMEOUT_S = 300  # the warm-up stops waiting (and compiles on its own) after this
IDLE_PROBE_S = 0.2  # how long the first compile measures the cores' use, the warm-up's own included
MIN_IDLE_CORES = 0.5  # idle cores the helper needs: with none, it would slow the warm-up and others' work
SWITCH = "STEPSTREAM_COMPILE_HELPER"  # "0": never start the helper


def _spec(model) -> dict:
    """What the helper needs to compile the model's kernels with the types the model passes."""
    cfg = model.cfg
    return {"formats": int(model.int8), "kv_types": list(model.options.kv_types), "head_dim": int(cfg.head_dim),
            "hidden": int(cfg.hidden)}


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class _Helper(event.Listener):
    """Starts the helper at the first compile of the warm-up (a Numba compile event)."""

    def __init__(self, spec: dict, useful: bool):
        self.spec = spec
        self.useful = useful
        self.proc: subprocess.Popen | None = None

    def on_start(self, ev) -> None:
        if self.useful and self.proc is None:
            if idle_cores(IDLE_PROBE_S) < MIN_IDLE_CORES:  # the other cores' work would only be shared three ways
                self.useful = False
                return
            env = child_env(NUMBA_NUM_THREADS="1")  # it runs its kernels on empty inputs
            try:
                spec = json.dumps({**self.spec, "parent": os.getpid()})  # it dies with this process
                self.proc = subprocess.Popen([sys.executable, "-m", "runtime.model.precompile", spec],
                                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                             stderr=subprocess.DEVNULL, env=env)
            except OSError:  # no helper: the warm-up compiles everything itself, as before
                self.useful = False

    def on_end(self, ev) -> None:
        pass

    def wait(self) -> None:
        """Until the helper is done (at most HELPER_TIMEOUT_S; it is stopped after that)."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.proc.wait(HELPER_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.stop()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@contextmanager
def alongside(model):
    """Within the block, the first kernel compile starts the helper for this model; `wait()` on
    the value waits for it. The helper is stopped if the block raises, and waited for at its end."""
    useful = model.gpu is None and _cores() >= 2 and os.environ.get(SWITCH, "1") != "0"  # else nothing to gain
    helper = _Helper(_spec(model), useful=useful)
    event.register("numba:compile", helper)
    try:
        yield helper
    finally:
        event.unregister("numba:compile", helper)
        helper.stop()  # what it has not compiled yet, the block did not need


# ---------------------------------------------------------------- the helper's side

def compile_kernels(formats: int, kv_types: tuple[str, str], head_dim: int, hidden: int) -> None:
    """Compile (or load) the kernels named in the module doc, in the reverse of the order a
    warm-up comes to them, for int8 format set `formats` (0: none of the int8 ones) and a KV cache of these types,
    by calling each on empty inputs of the types the model passes."""
    from quant import int8_kernels as q8
    from runtime.model.attention_kernels import chunk_attention, decode_attention
    from runtime.model.decode_kernels import router_logits
    from runtime.model.kv_cache import LayerKV

    f32 = np.float32
    kv = LayerKV(1, head_dim, 4, False, 0, tuple(kv_types))
    keys, kscale, vals, vscale, kpos = kv.view()
    h = 256 * max(1, hidden // 256)
    if formats:
        k = q8.kernels(formats)
        steps = q8.step_addresses(formats)  # also loads (or compiles) the steps the GEMV takes
        k.swiglu(np.zeros((0, 6), np.int64), np.zeros(1, f32), np.zeros(1, f32), np.zeros((1, h), f32)[0],
                 np.zeros(h, f32), q8.ffn_scratch(h, 1, 256), steps)
        vec = [np.zeros(head_dim, f32) for _ in range(6)]
        decode_attention(*vec, f32(1e-6), np.ones(0, f32), np.ones(0, f32), kv.k, kv.v, kv.pos, 0, 0, 0,
                         np.zeros((1, 4), f32), np.zeros(head_dim, f32), kv.ks, kv.vs)
        k.gemv(*[np.zeros(0, np.int64) for _ in range(5)], np.zeros(256, np.int8), np.zeros(1, f32),
               np.zeros(16, np.int32), np.zeros(0, f32), steps)
        gemm_formats = [int(t) for t in q8.GEMM_FORMATS if q8.FORMAT_BIT.get(int(t), 0) & formats]
        if gemm_formats:  # a prefill chunk's routed experts (no experts: nothing runs)
            k.experts(np.zeros((0, 6), np.int64), np.zeros(0, np.int64), np.zeros(1, np.int64), np.zeros(0, f32),
                      np.zeros(0, f32), np.zeros((1, h), f32), np.zeros((1, h), f32), q8._steps_of(gemm_formats))
            # read-only weights, as from a memory map
            k.gemm(gemm_formats[0], np.frombuffer(bytes(16 * 288), np.uint8).reshape(16, 288),
                   np.zeros((0, 256), np.int8), np.zeros((0, 1), f32), np.zeros((0, 16), np.int32),
                   np.zeros((0, 16), f32), q8._gemm_steps(gemm_formats[0]))
            for t in gemm_formats[1:]:  # the steps of the file's other formats (each a library of its own)
                q8._gemm_steps(t)
    q = np.zeros((0, 1, head_dim), f32)
    chunk_attention(q, keys, vals, kpos, np.zeros(0, np.int64), 0, np.empty_like(q), np.zeros((0, 1), f32),
                    kscale, vscale)
    if formats:
        router_logits(np.frombuffer(bytes(4 * h), f32).reshape(1, h), np.zeros(h, f32), np.zeros(1, f32))

def _die_with(parent: int) -> None:
    """End this process when `parent` ends, however it ends (SIGTERM, SIGHUP, SIGKILL: a first
    run stopped while it compiles would otherwise leave the helper compiling for a minute):
    Linux's parent-death signal, then a check that the parent had not gone already."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the warm-up's end still stops it
        pass
    if os.getppid() != parent:
        os._exit(0)


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def main(argv: list[str]) -> int:
    spec = json.loads(argv[0])
    if "parent" in spec:
        _die_with(int(spec["parent"]))
    compile_kernels(spec["formats"], tuple(spec["kv_types"]), spec["head_dim"], spec["hidden"])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
