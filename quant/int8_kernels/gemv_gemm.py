"""Parallel int8-activation loops over GGUF rows: quantize, GEMV, grouped GEMV, GEMM.

Shape legend
    R  rows of W     C  columns (a multiple of 256)     N  tokens
    w            uint8 [R, row_bytes]       GGUF rows of one format
    xq, xd, xb   one token's int8 activations (see row_dot): int8 [C], float32 [C / 256], int32 [C / 16]
    XQ, XD, XB   the same for N tokens: [N, C], [N, C / 256], [N, C / 16]
    qt, addr, rb, starts   a group of matrices sharing an input (see int8_kernels.Group):
                 format codes, addresses and row bytes [M], and starts [M + 1], matrix m's rows
                 being rows starts[m] .. starts[m + 1] of the stacked output
    formats      the format set the kernel is compiled for (dispatch.FORMAT_BIT): a closure
                 variable of `kernels(formats)`, a compile-time constant of its kernels
    steps        int64 [SLOTS len(step_library.FORMATS)]: the addresses of the compiled VNNI
                 steps of the formats at hand (step_library.steps_for, summed over formats;
                 zeros where a format's are not loaded, or on hosts without VNNI)
Kernels write their output buffer and allocate only small per-call scratch.
"""

from __future__ import annotations

from functools import lru_cache
from types import SimpleNamespace

import numba as nb
import numpy as np
from numba import types
from numba.core.errors import TypingError
from numba.extending import overload

from ..bits import u8_at
from ..jit import ALWAYS_INLINED
from . import avx512_vnni as vnni
from .avx512_vnni import LANE_BYTES
from .dispatch import BYTES_PER_256, FORMAT_BIT, IQ3_S, IQ4_NL, IQ4_XS, Q2_K, Q3_K, Q4_0, Q4_1, Q4_K, Q5_0, Q5_1, Q5_K, Q6_K, Q8_0
from .step_library import FORMATS as STEP_FORMATS
from .step_library import SLOTS, call_decoder, call_step
from .row_dot import GEMM8_FORMATS, GEMM8_SET, q8dot, q8dot4, q8dot8, quantize_row


_BYTES_256 = np.zeros(64, np.int64)  # GGUF bytes of 256 columns, by format code
for _code, _bytes in BYTES_PER_256.items():
    _BYTES_256[_code] = _bytes
STEP_CODES = {"q4_k": Q4_K, "q6_k": Q6_K, "q5_k": Q5_K, "q2_k": Q2_K, "q3_k": Q3_K, "iq4_xs": IQ4_XS, "q4_0": Q4_0,
              "q4_1": Q4_1, "q5_0": Q5_0, "q5_1": Q5_1, "iq4_nl": IQ4_NL, "q8_0": Q8_0, "iq3_s": IQ3_S}  # step_library's names
VNNI_SET = sum(FORMAT_BIT[c] for c in STEP_CODES.values())  # the formats with 16-row VNNI GEMM steps
STEP_BASE = np.full(64, -1, np.int64)  # by format code: where its steps start in a GEMM's steps argument
SUMS_PER = np.ones(64, np.int64)  # by format code: the 16-column sums its steps take summed in pairs (2) or not
for _f, _name in enumerate(STEP_FORMATS):
    STEP_BASE[STEP_CODES[_name]] = SLOTS * _f
    SUMS_PER[STEP_CODES[_name]] = 2 if vnni.SUMS_BYTES[_name] == 16 else 1


@nb.njit(inline="always", cache=True)
def bytes_per_256(qtype):
    return _BYTES_256[qtype]


@nb.njit(inline="always", cache=True)
def find(starts, g):
    """The m with starts[m] <= g < starts[m + 1] (starts ascending; a handful of entries)."""
    m = 0
    while starts[m + 1] <= g:
        m += 1
    return m


ROWS_PER_CHUNK = 8  # single rows a parallel iteration of group_gemv runs in turn (16-row groups: one)
ONE_TOKEN = SLOTS - 2  # a format's one-token step in a steps array: STEP_TOKENS ends with 1
ROW_DOT_FORMATS = (Q6_K, Q8_0)  # step formats whose GEMV stays with the row dot (see row_blocks)
GEMV_STEP = np.zeros(64, np.int64)  # by format code: 1 where the GEMV runs 16-row groups by the step
for _code in STEP_CODES.values():
    GEMV_STEP[_code] = _code not in ROW_DOT_FORMATS


def row_blocks(formats, qtype, n_rows, steps):
    """How many 16-row groups of an n_rows matrix of format qtype the GEMV runs through the VNNI
    GEMM's one-token step (step_library; `steps` holds the addresses, step_library.steps_for),
    the rest row by row by the AVX2 row dot, whose roundings are the same: n_rows // 16 for the
    step formats but Q6_K and Q8_0 on VNNI hosts, when `steps` holds that format's, else 0.

    Measured with the weights in memory, as a decode step has them (many distinct matrices,
    256 MB, one thread, step over row dot GB/s): Q4_K 23.6 / 13.7 on [2048, 4096] and 18.2 /
    12.2 on [4096, 1280]; Q4_0, Q4_1, Q5_0, IQ4_NL, IQ4_XS, Q2_K, Q3_K 1.2-2.3x; Q5_K and Q5_1
    1.4-1.6x on [2048, 4096], about even on [4096, 1280]; Q6_K 10.4 / 18.5 and Q8_0 16.5 /
    25.1, which stay with the row dot. IQ3_S 1.1x. The step's prefetch into
    L2, not L1, is what makes it pay from memory (see avx512_vnni). In Numba code only;
    `formats` a compile-time constant."""
    raise NotImplementedError("row_blocks is for Numba code")


@overload(row_blocks, **ALWAYS_INLINED)
def _row_blocks(formats, qtype, n_rows, steps):
    if not isinstance(formats, types.IntegerLiteral):
        raise TypingError("row_blocks needs the format set as a compile-time constant")
    if not (vnni.AVAILABLE and formats.literal_value & VNNI_SET & ~(FORMAT_BIT[Q6_K] | FORMAT_BIT[Q8_0])):
        return lambda formats, qtype, n_rows, steps: 0

    def impl(formats, qtype, n_rows, steps):  # no branch: a value phi confuses Numba's inliner
        base = STEP_BASE[qtype]
        return (n_rows // 16) * GEMV_STEP[qtype] * np.int64(steps[max(base, 0) + ONE_TOKEN] != 0)
    return impl


@nb.njit(inline="always", cache=True)
def activation_sums(xb, xs4, xs6):
    """The int16 sums of the GEMM steps from one token's xb: per 32 columns (Q4_K) and per 16 (Q6_K)."""
    for j in range(xs4.shape[0]):
        xs4[j] = np.int16(xb[2 * j] + xb[2 * j + 1])
    for j in range(xs6.shape[0]):
        xs6[j] = np.int16(xb[j])


@nb.njit(inline="always", fastmath=True, cache=True)
def gemv_unit(formats, qtype, wa, rb, n_rows, k, xq, xd, xb, xs4, xs6, out, steps):
    """Unit k of an n_rows matrix (at address wa, rb bytes a row) times one token, into out
    [n_rows]: units 0 .. row_blocks - 1 are 16-row groups (a one-token step each), the rest
    single rows after them. Units = row_blocks + n_rows - 16 row_blocks. xs4, xs6: the token's
    int16 sums per 32 and per 16 columns (activation_sums), which the steps take."""
    nb16 = row_blocks(formats, qtype, n_rows, steps)
    if k < nb16:
        xs = xs4.ctypes.data if SUMS_PER[qtype] == 2 else xs6.ctypes.data
        z = np.int64(0)
        group_steps(steps, STEP_BASE[qtype], wa + 16 * k * rb, rb, np.int64(xq.shape[0] // 256), np.int64(1),
                    np.int64(xq.ctypes.data), z, np.int64(xs), z, np.int64(xd.ctypes.data), z,
                    np.int64(out.ctypes.data) + 64 * k, z)
    else:
        out[k + 15 * nb16] = q8dot(formats, qtype, u8_at(wa + (k + 15 * nb16) * rb, rb), xq, xd, xb)


@nb.njit(inline="always", fastmath=True, cache=True)
def group_gemv(formats, qt, addr, rb, starts, col0, xq, xd, xb, out, steps):
    """out = the group's rows times the int8 activations, in parallel units of 16 rows (through
    the one-token VNNI steps at the addresses `steps`, see row_blocks) or single rows; matrix m
    reads the columns col0[m] .. col0[m] + C_m of the activations (C_m its own columns, from its
    row bytes: all zeros for matrices sharing one input, the FFNs' offsets for their down
    matrices); inlinable into a larger kernel."""
    m_count = qt.shape[0]
    xs4 = np.empty(xb.shape[0] // 2, np.int16)
    xs6 = np.empty(xb.shape[0], np.int16)
    activation_sums(xb, xs4, xs6)
    chunks = np.empty(m_count + 1, np.int64)  # parallel iterations: one 16-row block or ROWS_PER_CHUNK rows
    chunks[0] = 0
    for m in range(m_count):
        n = starts[m + 1] - starts[m]
        blocks = row_blocks(formats, qt[m], n, steps)
        per = 1 if blocks else ROWS_PER_CHUNK
        chunks[m + 1] = chunks[m] + (n - 15 * blocks + per - 1) // per
    for ch in nb.prange(chunks[m_count]):
        m = find(chunks, ch)
        n = starts[m + 1] - starts[m]
        blocks = row_blocks(formats, qt[m], n, steps)
        per = 1 if blocks else ROWS_PER_CHUNK
        units = n - 15 * blocks
        a = col0[m]
        b = a + rb[m] // bytes_per_256(qt[m]) * 256
        mq, md, mb, m4, m6 = xq[a:b], xd[a // 256:b // 256], xb[a // 16:b // 16], xs4[a // 32:b // 32], xs6[a // 16:b // 16]
        mo = out[starts[m]:starts[m + 1]]
        k0 = (ch - chunks[m]) * per
        for k in range(k0, min(k0 + per, units)):
            gemv_unit(formats, qt[m], addr[m], rb[m], n, k, mq, md, mb, m4, m6, mo, steps)


@nb.njit(parallel=True, fastmath=True, cache=True)
def quantize(X, q, d, b):
    for t in nb.prange(X.shape[0]):
        quantize_row(X[t], q[t], d[t], b[t])


# ---------------------------------------------------------------- GEMM

def row_passes8(formats, qtype, w, XQ, XD, XB, out, r):
    """Row r of GGUF rows w times the tokens, 8 per pass, for formats with an 8-token row step
    (row_dot.GEMM8_FORMATS), whose decode costs several tokens' terms: a last group of 2-7
    tokens is one more pass, padded with the last token (cheaper than 4-token and one-token
    passes). Returns how many tokens it did: all, or the last one left over; 0 for other
    formats. In Numba code only; `formats` a compile-time constant."""
    raise NotImplementedError("row_passes8 is for Numba code")


@overload(row_passes8, **ALWAYS_INLINED)
def _row_passes8(formats, qtype, w, XQ, XD, XB, out, r):
    if not isinstance(formats, types.IntegerLiteral):
        raise TypingError("row_passes8 needs the format set as a compile-time constant")
    if not formats.literal_value & GEMM8_SET:
        return lambda formats, qtype, w, XQ, XD, XB, out, r: 0

    def impl(formats, qtype, w, XQ, XD, XB, out, r):
        if not _HAS8[qtype]:
            return 0
        n = XQ.shape[0]
        done = n if n % 8 != 1 else n - 1
        for t in range(0, done, 8):
            sums = q8dot8(formats, qtype, w[r], XQ, XD, XB, t, done - 1)
            for i in range(min(8, done - t)):  # the padded pass's repeats of the last token are dropped
                out[t + i, r] = sums[i]
        return done
    return impl


_HAS8 = np.zeros(64, np.bool_)  # by format code: whether it has an 8-token row step
for _code in GEMM8_FORMATS:
    _HAS8[_code] = True


@nb.njit(inline="always", fastmath=True, cache=True)
def row_steps(formats, qtype, w, XQ, XD, XB, out, r):
    """Row r of GGUF rows w times every token: 8 tokens per pass where the format has such a
    step, then 4 per pass, then one at a time."""
    n = XQ.shape[0]
    t0 = row_passes8(formats, qtype, w, XQ, XD, XB, out, r)
    for g in range((n - t0) // 4):
        t = t0 + 4 * g
        a0, a1, a2, a3 = q8dot4(formats, qtype, w[r], XQ, XD, XB, t)
        out[t, r] = a0
        out[t + 1, r] = a1
        out[t + 2, r] = a2
        out[t + 3, r] = a3
    for t in range(n - (n - t0) % 4, n):
        out[t, r] = q8dot(formats, qtype, w[r], XQ[t], XD[t], XB[t])


@nb.njit(inline="always", cache=True)
def _activation_sums(qtype, XB):
    """int16 [N, C / 32] (sums per 32 columns: SUMS_PER[qtype] = 2) or [N, C / 16] (Q6_K, Q2_K, Q3_K) from XB."""
    n = XB.shape[0]
    per = SUMS_PER[qtype]
    xs = np.empty((n, XB.shape[1] // per), np.int16)
    for t in range(n):
        for m in range(xs.shape[1]):
            v = np.int32(0)
            for k in range(per):
                v += XB[t, per * m + k]
            xs[t, m] = np.int16(v)
    return xs


@nb.njit(inline="always", cache=True)
def _passes(steps, base, wa, row_bytes, nsb, n, xq0, xqs, xs0, xss, xd0, xds, o0, os_):
    t = 0
    while t < n:
        left = n - t
        k = 0 if left >= 8 else 1 if left >= 4 else 2 if left >= 2 else 3
        call_step(steps[base + k], wa, row_bytes, nsb, xq0 + t * xqs, xqs, xs0 + t * xss, xss, xd0 + t * xds, xds,
                  o0 + t * os_, os_)
        t += 8 >> k


@nb.njit(inline="always", cache=True)
def group_steps(steps, base, wa, row_bytes, nsb, n, xq0, xqs, xs0, xss, xd0, xds, o0, os_):
    """One group of 16 GGUF rows (the first at wa) times n tokens: 8 per pass while 8 are left,
    then 4, 2, 1, each pass one call of a compiled step (step_library: steps[base + k] takes
    8 >> k tokens). The group's weights stay in cache between passes, so they are read from
    memory once. A format with a decoder (steps[base + SLOTS - 1]: IQ3_S, whose grid lookups
    cost more than a pass's products) is decoded once into lane vectors, which every pass reads."""
    decoder = steps[base + SLOTS - 1]
    if decoder != 0:
        lanes = np.empty(nsb * LANE_BYTES + 64, np.uint8)
        at = (lanes.ctypes.data + 63) // 64 * 64
        call_decoder(decoder, wa, row_bytes, nsb, at)
        _passes(steps, base, at, np.int64(0), nsb, n, xq0, xqs, xs0, xss, xd0, xds, o0, os_)
        lanes[0] = 0  # lanes lives through the passes
    else:
        _passes(steps, base, wa, row_bytes, nsb, n, xq0, xqs, xs0, xss, xd0, xds, o0, os_)


@lru_cache(maxsize=None)
def build(formats: int) -> SimpleNamespace:
    """The kernels for matrices of the formats in `formats` (see dispatch.format_set):
    gemv(qt, addr, rb, starts, col0, xq, xd, xb, out, steps)   a group's rows times quantized
                                                  activations; steps: as gemm's, for every format
                                                  of the group (zeros: row dots only)
    gemm(qtype, w, XQ, XD, XB, out, steps)        GGUF rows times N tokens (GEMM_FORMATS); steps: see
                                                  step_library.steps_for (VNNI hosts; else unused)
    gemm_rows(qtype, w, XQ, XD, XB, out)          the same, each token through the GEMV's row dot"""

    @nb.njit(parallel=True, fastmath=True, cache=True)
    def gemm_rows(qtype, w, XQ, XD, XB, out):
        """Rows in parallel, every token of a row in turn while the row is in cache."""
        for row in nb.prange(w.shape[0]):
            for t in range(XQ.shape[0]):
                out[t, row] = q8dot(formats, qtype, w[row], XQ[t], XD[t], XB[t])

    @nb.njit(parallel=True, fastmath=True, cache=True)
    def gemv(qt, addr, rb, starts, col0, xq, xd, xb, out, steps):
        group_gemv(formats, qt, addr, rb, starts, col0, xq, xd, xb, out, steps)

    if vnni.AVAILABLE and formats & VNNI_SET:
        @nb.njit(parallel=True, fastmath=True, cache=True)
        def gemm(qtype, w, XQ, XD, XB, out, steps):
            """Formats with VNNI steps (STEP_CODES): 16-row groups straight from the GGUF rows
            (avx512_vnni, through the steps at the addresses `steps`, step_library.steps_for),
            the rows left over one at a time; other formats: rows in parallel, 4 tokens per pass."""
            n, c = XQ.shape
            r = out.shape[1]
            base = STEP_BASE[qtype]
            grouped = r - r % 16 if base >= 0 else 0
            if grouped:
                xs = _activation_sums(qtype, XB)
                xqs, xss, xds, os_ = np.int64(c), np.int64(2 * xs.shape[1]), np.int64(4 * (c // 256)), np.int64(4 * r)
                rb = np.int64(w.shape[1])
                for g in nb.prange(r // 16):
                    group_steps(steps, base, w[16 * g].ctypes.data, rb, c // 256, n, XQ.ctypes.data, xqs,
                                 xs.ctypes.data, xss, XD.ctypes.data, xds, out.ctypes.data + 64 * g, os_)
            for row in nb.prange(grouped, r):
                row_steps(formats, qtype, w, XQ, XD, XB, out, row)
    else:
        @nb.njit(parallel=True, fastmath=True, cache=True)
        def gemm(qtype, w, XQ, XD, XB, out, steps):
            """Rows in parallel, 4 tokens per pass (`steps` unused; the VNNI steps would abort LLVM here)."""
            for row in nb.prange(w.shape[0]):
                row_steps(formats, qtype, w, XQ, XD, XB, out, row)

    return SimpleNamespace(gemv=gemv, gemm=gemm, gemm_rows=gemm_rows)


def gemv_in_kernel(formats, qt, addr, rb, starts, xq, xd, xb, out, steps):
    """build(formats).gemv(...) on matrices sharing the input xq, callable from a Numba kernel built
    for the same format set (a compile-time constant there): the call goes to the compiled parallel
    kernel, which other callers share, instead of inlining another parallel loop into the caller."""
    build(formats).gemv(qt, addr, rb, starts, np.zeros(qt.shape[0], np.int64), xq, xd, xb, out, steps)


def gemv_cols_in_kernel(formats, qt, addr, rb, starts, col0, xq, xd, xb, out, steps):
    """As gemv_in_kernel, matrix m reading the columns from col0[m] on (see group_gemv). A kernel
    calls these rather than closing over the compiled GEMV: Numba keys a closure's cache entry
    on its pickled variables, and a pickled kernel differs from process to process."""
    build(formats).gemv(qt, addr, rb, starts, col0, xq, xd, xb, out, steps)


def _compiled_gemv(formats):
    if not isinstance(formats, types.IntegerLiteral):
        raise TypingError("gemv_in_kernel needs the format set as a compile-time constant")
    return build(formats.literal_value).gemv


@overload(gemv_in_kernel)
def _gemv_in_kernel(formats, qt, addr, rb, starts, xq, xd, xb, out, steps):
    gemv = _compiled_gemv(formats)

    def impl(formats, qt, addr, rb, starts, xq, xd, xb, out, steps):
        gemv(qt, addr, rb, starts, np.zeros(qt.shape[0], np.int64), xq, xd, xb, out, steps)
    return impl


@overload(gemv_cols_in_kernel)
def _gemv_cols_in_kernel(formats, qt, addr, rb, starts, col0, xq, xd, xb, out, steps):
    gemv = _compiled_gemv(formats)

    def impl(formats, qt, addr, rb, starts, col0, xq, xd, xb, out, steps):
        gemv(qt, addr, rb, starts, col0, xq, xd, xb, out, steps)
    return impl
