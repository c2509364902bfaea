"""A first run compiles only what the shipped model needs (issue 11, "first impression").

The slow test runs `stepstream demo -n 1` with an empty Numba cache and records every function
Numba compiles (runtime.bench.cold_start): each kernel built for an int8 format set must be
built for the formats the file holds and no others, and the demo, whose prompt goes through
prefill and then token by token, must not compile the few-token block kernels it never runs.
The fast test checks that the jit options that make an always-inlined overload's throwaway
compile cheap (quant.jit.ALWAYS_INLINED) leave the code inlined into a caller as it was. The
compile helper's check shares a fresh compile with tests/test_kernel_cache.py.
"""

from __future__ import annotations

import re
from collections import Counter

import numba as nb
import numpy as np
import pytest
from numba.extending import overload

from quant.jit import ALWAYS_INLINED


def _file_formats(path) -> int:
    from quant.int8_kernels import format_set
    from runtime.base.gguf_file import GGUFModelFile

    return format_set(t.qtype for t in GGUFModelFile(path).tensors.values())


@pytest.mark.slow
def test_demo_first_token_compiles_only_the_files_formats():
    from runtime.bench.cold_start import compile_events
    from runtime.cli.demo import PROMPT, model_path

    held = _file_formats(model_path())
    assert held, "the shipped model has int8 formats"
    # (the compile helper stays off, as conftest sets it: the demo's process compiles everything
    # it runs, so every kernel it needs is checked here, whatever the machine's load)
    first, events, warm = compile_events(["demo", "-n", "1", "-p", PROMPT], PROMPT, warm=True)
    per_set = [e for e in events if e["formats"] is not None]
    assert per_set, "no kernel built for a format set was compiled: the recorder saw nothing"
    foreign = sorted({(e["function"], e["formats"]) for e in per_set if e["formats"] & ~held})
    assert not foreign, f"compiled for formats the file does not hold (file: {held}): {foreign}"
    # the few-token block step (MTP verify passes, prompts of 2..8 tokens): the demo runs neither
    names = {e["function"] for e in events}
    for unused in ("few_kernels.build.<locals>.ffn", "few_kernels.build.<locals>.attention_half",
                   "few_kernels.attention_tokens"):
        assert not any(n.endswith(unused) for n in names), unused
    # a kernel built again (a format set spelled two ways, a cache of builders missed) compiles
    # again for the same types; overload implementations (".impl") are compiled once per template
    ours = [e for e in events if e["function"].startswith(("quant.", "runtime.", "offload."))
            and not e["function"].endswith(".impl")]
    twice = [k for k, n in Counter((e["function"], tuple(e["args"])) for e in ours).items() if n > 1]
    assert not twice, f"compiled twice for the same types: {twice}"
    # a second run loads every kernel from the cache (a kernel whose cache key differs from process
    # to process, such as one closing over a compiled kernel, would compile on every run)
    again = sorted({e["function"] for e in warm if e["function"].startswith(("quant.", "runtime.", "offload."))})
    assert not again, f"compiled again on a warm cache: {again}"
    print(f"cold demo: first token after {first.seconds:.1f} s ({first.cpu} s of CPU), {len(events)} compiles")


def test_the_bench_times_the_demos_own_prompt():
    """cold_start spells out the demo's default prompt (it may not import the CLI, which sits
    above it in the layers): the copy must be the demo's."""
    from runtime.bench.cold_start import DEMO_PROMPT, with_prompt
    from runtime.cli.demo import PROMPT

    assert DEMO_PROMPT == PROMPT
    assert with_prompt(["demo", "-n", "1"]) == (["demo", "-n", "1", "-p", PROMPT], PROMPT)
    assert with_prompt(["run", "-m", "x.gguf", "-p", "hi"])[1] == "hi"


# ------------------------------------------------------------ ALWAYS_INLINED leaves the caller as it was

def _stub_a(x, k):
    raise NotImplementedError


def _stub_b(x, k):
    raise NotImplementedError


def _impl(x, k):
    def impl(x, k):
        s = np.float32(0.0)
        for i in range(x.shape[0]):
            s += x[i] * np.float32(k)
        return s
    return impl


overload(_stub_a, inline="always")(_impl)
overload(_stub_b, **ALWAYS_INLINED)(_impl)


@nb.njit(fastmath=True)
def _caller_a(x):
    return _stub_a(x, 3) + np.float32(1.0)


@nb.njit(fastmath=True)
def _caller_b(x):
    return _stub_b(x, 3) + np.float32(1.0)


def _body(dispatcher) -> str:
    """The caller's optimized LLVM IR with every name and metadata reference taken out."""
    (ir,) = dispatcher.inspect_llvm().values()
    for pattern, name in ((r'[@%!]"[^"]*"', "N"), (r'c"[^"]*"', "S"), (r"\[\d+ x i8\]", "A"),
                          (r"[@%!][-\w.$]+", "N"), (r"\bB\d+", "B")):
        ir = re.sub(pattern, name, ir)
    return "\n".join(line for line in ir.splitlines() if not line.startswith(("; ModuleID", "source_filename")))


def test_always_inlined_overload_compiles_the_caller_unchanged():
    x = np.linspace(-1, 1, 37, dtype=np.float32)
    ref = np.float32(np.sum(x.astype(np.float64) * 3.0) + 1.0)
    a, b = _caller_a(x), _caller_b(x)
    assert a == b and abs(a - ref) <= 1e-5 * 37
    assert _body(_caller_a) == _body(_caller_b)
    # and the overload was inlined: no call left in the caller but Numba's runtime helpers
    assert not re.search(r"call .*_stub_|call .*impl", next(iter(_caller_b.inspect_llvm().values())))


# ------------------------------------------------------------ a row dot is built once per kernel

def test_a_kernel_holds_one_copy_of_a_row_dot_however_often_it_calls_it():
    """Two calls of the Q4_K row dot in one kernel: one function in its code, called twice (it
    was emitted at every call), with gguf-py's dequantized rows' products (float64) as results."""
    from quant.int8_kernels import avx2
    from quant.int8_kernels.row_dot import q8dot_q4_k_simd, quantize_row
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    if not avx2.AVAILABLE:
        pytest.skip("the AVX2 row dots do not compile on this host")

    @nb.njit(fastmath=True)
    def two_rows(w, xq, xd, xb, out):
        out[0] = q8dot_q4_k_simd(w[0], xq, xd, xb)
        out[1] = q8dot_q4_k_simd(w[1], xq, xd, xb)

    rng = np.random.default_rng(1)
    cols = 512
    w = rng.integers(0, 256, (2, 144 * cols // 256), dtype=np.uint8)
    for sb in range(cols // 256):  # sane float16 scales d and dmin in every super-block
        w[:, 144 * sb:144 * sb + 4] = np.frombuffer(np.array([0.01, 0.002], np.float16).tobytes(), np.uint8)
    x = rng.standard_normal(cols).astype(np.float32)
    xq, xd, xb = np.empty(cols, np.int8), np.empty(cols // 256, np.float32), np.empty(cols // 16, np.int32)
    quantize_row(x, xq, xd, xb)
    out = np.empty(2, np.float32)
    two_rows(w, xq, xd, xb, out)
    xr = xq.astype(np.float64) * np.repeat(xd.astype(np.float64), 256)
    ref = dequantize(w, GGMLQuantizationType.Q4_K).astype(np.float64) @ xr  # gguf-py's, independent
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    (ir,) = two_rows.inspect_llvm().values()
    assert len(re.findall(r'define [^@]*@"?stepstream\.int8\.q4_k\.row_dot1"?\(', ir)) == 1
    assert len(re.findall(r'call [^@]*@"?stepstream\.int8\.q4_k\.row_dot1"?\(', ir)) <= 2
