"""Numba quantizers for the K-quant formats Q4_K, Q5_K and Q6_K.

Shape legend
    R   rows of the matrix being quantized
    C   weights per row (a multiple of 256)
    S   super-blocks per row, C // 256
    J   32-weight sub-blocks per row, C // 32 (the SIMD lanes of the Q4_K/Q5_K kernels)
    T   candidate (scale, min) pairs evaluated together in one step of pass 3
    x   float32 [R, C]   the weights
    out uint8   [R, S * block_bytes]   GGUF bytes

Each format is quantized in three passes over the rows:
  1. fit a (scale, min) pair to every 32-weight sub-block (Q4_K, Q5_K) or a
     scale to every 16-weight group (Q6_K) by searching a small grid of
     candidate step sizes and solving a weighted least-squares problem for each;
  2. derive the super-block's f16 scale(s) from the largest fitted values and
     round them to f16 (in numpy, which rounds exactly like the C code);
  3. round each sub-block's scale to its 6-bit (8-bit for Q6_K) integer, trying
     the neighbouring integers too and keeping the one whose *decoded* weights
     are closest to x, then write the codes.
Pass 3 measures error with the exact float32 arithmetic of the decoder, which is
why these quantizers match or beat ggml's reference ones on plain RMSE.

Why float32. The Q4_K/Q5_K passes compute in float32, as ggml's C quantizers do: float64
halved the SIMD width and cost 1.5x the time, for the same error (RMSE within 0.03%, either
side, on the tests' weight sets). tests/helpers/kquant_reference.py is a plain numpy float32
version of these passes; the tests hold the kernels to its bytes.

Why lanes. The Q4_K/Q5_K passes sum in a fixed order, one sub-block at a time; those sums
are sequential, so a sub-block on its own cannot use SIMD.
The kernels below therefore lay a row's J sub-blocks side by side (element i of sub-block j
at [i, j]) and run the same arithmetic for all of them in the inner loop: each lane keeps
its own sums in its own order, so the result is bit-identical to fitting one sub-block after
another, while LLVM vectorizes across sub-blocks. Pass 3's first round is the same for every
sub-block (the rounded scale and min and their neighbours: nine slots), so it runs as nine
lane passes over the row in place; later rounds are data-dependent (how far the min moves),
so they run as a work list: every step gathers each unfinished search's untried (scale, min)
candidates into T columns and evaluates them all at once. A candidate
already evaluated is never evaluated again: it cannot beat a best it is part of, so skipping
it changes nothing. The `error_model="numpy"` flag lets masked-out lanes divide by zero
(their results are discarded) instead of raising.
"""

from __future__ import annotations

import numba as nb
import numpy as np

from .formats import QK_K

_JIT = dict(cache=True, nogil=True)
_LANES = dict(cache=True, nogil=True, error_model="numpy")
_F0 = np.float32(0.0)  # float32 constants: a float64 literal would widen float32 arithmetic
_F1 = np.float32(1.0)


# ---------------------------------------------------------------- pass 1: sub-block fits

@nb.njit(inline="always", **_LANES)
def _round_sums(xt, w, lq, inv, off, nmax, sl, sl2, sxl, J):
    """Codes lq [32, J] of rounding at (inv, off) and their weighted sums, lane by lane."""
    for j in range(J):
        sl[j] = 0.0
        sl2[j] = 0.0
        sxl[j] = 0.0
    for i in range(32):
        for j in range(J):
            v = xt[i, j]
            q = min(max(np.rint((v - off[j]) * inv[j]), _F0), nmax)
            lq[i, j] = q
            sl[j] += w[i, j] * q
            sl2[j] += w[i, j] * q * q
            sxl[j] += w[i, j] * q * v


@nb.njit(inline="always", **_LANES)
def _fit_error(xt, w, lq, ca, cb, err, J):
    """Weighted squared error err [J] of the fit ca * lq + cb."""
    for j in range(J):
        err[j] = 0.0
    for i in range(32):
        for j in range(J):
            e = ca[j] * lq[i, j] + cb[j] - xt[i, j]
            err[j] += w[i, j] * e * e


@nb.njit(inline="always", **_LANES)
def _error_and_sums(xt, w, lq_prev, ca, cb, err, lq, inv, off, nmax, sl, sl2, sxl, J):
    """_fit_error of one candidate and _round_sums of the next in one pass over the weights."""
    for j in range(J):
        err[j] = 0.0
        sl[j] = 0.0
        sl2[j] = 0.0
        sxl[j] = 0.0
    for i in range(32):
        for j in range(J):
            v = xt[i, j]
            e = ca[j] * lq_prev[i, j] + cb[j] - v
            err[j] += w[i, j] * e * e
            q = min(max(np.rint((v - off[j]) * inv[j]), _F0), nmax)
            lq[i, j] = q
            sl[j] += w[i, j] * q
            sl2[j] += w[i, j] * q * q
            sxl[j] += w[i, j] * q * v


@nb.njit(inline="always", **_LANES)
def _solve(sw, sx, sl, sl2, sxl, ca, cb, ok, J):
    """Least-squares (a, b) of x ~ a * L + b from the sums; ok: the system is not singular."""
    for j in range(J):
        det = sw[j] * sl2[j] - sl[j] * sl[j]
        a = (sw[j] * sxl[j] - sx[j] * sl[j]) / det
        b = (sl2[j] * sx[j] - sl[j] * sxl[j]) / det
        if b > _F0:  # the offset must not be positive: refit through zero
            b = _F0
            a = sxl[j] / sl2[j]
        ca[j] = a
        cb[j] = b
        ok[j] = _F0 if det <= _F0 else _F1


@nb.njit(inline="always", **_LANES)
def _take(ok, err, ca, cb, be, ba, bb, J):
    for j in range(J):
        if ok[j] != _F0 and err[j] < be[j]:
            be[j] = err[j]
            ba[j] = ca[j]
            bb[j] = cb[j]


@nb.njit(parallel=True, **_LANES)
def fit_affine_subblocks(x, levels, rmin, rdelta, nstep, scales, mins):
    """Pass 1 for Q4_K/Q5_K: scales, mins float32 [R, J] (outputs).

    Fits x ~ a*L - m per sub-block with integer L in [0, nmax] and m >= 0, weighted by
    w = rms + |x| (large weights matter more, small ones still count). Tries step sizes
    (nmax + rmin + rdelta*k) / (max - min) for k = 0..nstep, refits (a, m) by least squares
    for each rounding, and ends with one re-rounding step at the best fit. The step sizes
    do not depend on the fits, so the error of candidate k-1 and the sums of candidate k
    share one pass over the weights; only the final re-rounding waits for the best."""
    rows, cols = x.shape
    J = cols // 32
    nmax, r0, rd = np.float32(levels), np.float32(rmin), np.float32(rdelta)
    for r in nb.prange(rows):
        el = np.empty((4, 32, J), np.float32)  # [i, j] per lane: weight, importance, codes (two rounds)
        xt, w = el[0], el[1]
        st = np.zeros((17, J), np.float32)  # one row per lane variable
        ss, lo, hi, sw, sx, ba, bb, be = st[0], st[1], st[2], st[3], st[4], st[5], st[6], st[7]
        inv, off, sl, sl2, sxl, ca, cb, err, ok = st[8], st[9], st[10], st[11], st[12], st[13], st[14], st[15], st[16]
        for i in range(32):
            for j in range(J):
                v = x[r, 32 * j + i]
                xt[i, j] = v
                ss[j] += v * v
        for j in range(J):
            ss[j] = np.sqrt(ss[j] / np.float32(32))
            lo[j] = xt[0, j]
            hi[j] = xt[0, j]
        for i in range(32):
            for j in range(J):
                v = xt[i, j]
                w[i, j] = ss[j] + abs(v)
                lo[j] = v if v < lo[j] else lo[j]  # as ndarray.min(): the first of equals
                hi[j] = v if v > hi[j] else hi[j]
        for j in range(J):
            lo[j] = min(_F0, lo[j])
            ba[j] = (hi[j] - lo[j]) / nmax  # the plain min-max fit is the first best
            bb[j] = lo[j]
        for i in range(32):
            for j in range(J):
                v = xt[i, j]
                sw[j] += w[i, j]
                sx[j] += w[i, j] * v
                q = min(max(np.rint((v - lo[j]) / ba[j]), _F0), nmax)
                e = ba[j] * q + lo[j] - v
                be[j] += w[i, j] * e * e
        for k in range(nstep + 1):
            for j in range(J):
                inv[j] = (nmax + r0 + rd * np.float32(k)) / (hi[j] - lo[j])
                off[j] = lo[j]
            if k == 0:
                _round_sums(xt, w, el[2], inv, off, nmax, sl, sl2, sxl, J)
            else:
                _error_and_sums(xt, w, el[2 + (k - 1) % 2], ca, cb, err, el[2 + k % 2], inv, off, nmax,
                                sl, sl2, sxl, J)
                _take(ok, err, ca, cb, be, ba, bb, J)
            _solve(sw, sx, sl, sl2, sxl, ca, cb, ok, J)
        _fit_error(xt, w, el[2 + nstep % 2], ca, cb, err, J)
        _take(ok, err, ca, cb, be, ba, bb, J)
        for j in range(J):  # final: re-round at the best fit, where it has a positive scale
            inv[j] = _F1 / ba[j]
            off[j] = bb[j]
            ss[j] = _F0 if ba[j] <= _F0 else _F1  # ss is free once w is made
        _round_sums(xt, w, el[2], inv, off, nmax, sl, sl2, sxl, J)
        _solve(sw, sx, sl, sl2, sxl, ca, cb, ok, J)
        for j in range(J):
            ok[j] = ok[j] * ss[j]
        _fit_error(xt, w, el[2], ca, cb, err, J)
        _take(ok, err, ca, cb, be, ba, bb, J)
        for j in range(J):
            flat = hi[j] == lo[j]
            scales[r, j] = _F0 if flat else ba[j]
            mins[r, j] = -lo[j] if flat else -bb[j]


@nb.njit(parallel=True, **_LANES)
def fit_symmetric_groups(x, scales):
    """Pass 1 for Q6_K: signed scale per 16-weight group, codes in [-32, 31]; scales [R, C // 16].

    Tries 19 step sizes that put the group's largest weight near -32 and keeps the one whose
    least-squares scale (weights w = x^2) explains most of x. Lanes: the row's groups."""
    rows, cols = x.shape
    G = cols // 16
    for r in nb.prange(rows):
        xt = np.empty((16, G), np.float32)
        st = np.zeros((6, G), np.float64)
        amax, vmax, inv, sxl, sl2, bn = st[0], st[1], st[2], st[3], st[4], st[5]
        bs = np.zeros(G, np.float64)
        for i in range(16):
            for g in range(G):
                v = x[r, 16 * g + i]
                xt[i, g] = v
                if abs(v) > amax[g]:  # the first of equal magnitudes
                    amax[g] = abs(v)
                    vmax[g] = v
        for g in range(G):
            bn[g] = -1.0
        for k in range(-9, 10):
            for g in range(G):
                inv[g] = -(32.0 + 0.1 * k) / vmax[g]  # the largest weight lands near -32
                sxl[g] = 0.0
                sl2[g] = 0.0
            for i in range(16):
                for g in range(G):
                    v = xt[i, g]
                    q = min(max(np.rint(inv[g] * v), -32.0), 31.0)
                    wv = v * v
                    sxl[g] += wv * v * q
                    sl2[g] += wv * q * q
            for g in range(G):
                if sl2[g] > 0.0 and sxl[g] * sxl[g] > bn[g] * sl2[g]:
                    bn[g] = sxl[g] * sxl[g] / sl2[g]
                    bs[g] = sxl[g] / sl2[g]
        for g in range(G):
            scales[r, g] = 0.0 if amax[g] < 1e-15 else bs[g]


# ---------------------------------------------------------------- pass 3: integer scales and codes

@nb.njit(inline="always", **_LANES)
def _affine_code(v, ids, dm, nmax):
    """The code of weight v at decoded min dm and inverse decoded scale ids (float32, 0 when the
    scale is 0: all codes 0). A multiply, not a division: which code is picked only changes
    which candidate wins, and every candidate's error is measured the decoder's way."""
    q = min(max(np.rint((v + dm) * ids), _F0), nmax)
    return q if ids != _F0 else _F0


@nb.njit(inline="always", **_LANES)
def _inverse(ds):
    return _F1 / ds if ds != _F0 else _F0


@nb.njit(inline="always", **_LANES)
def _evaluate(xg, t_ds, t_dm, acc, T, nmax):
    """Squared error acc[0, t] and summed residual acc[1, t] of candidate t over its
    sub-block xg[:, t], in the decoder's float32 arithmetic, summed in order in float32."""
    for t in range(T):
        acc[0, t] = 0.0
        acc[1, t] = 0.0
    for i in range(32):
        for t in range(T):
            v = xg[i, t]
            ds = t_ds[t]
            dm = t_dm[t]
            q = _affine_code(v, _inverse(ds), dm, nmax)
            e = np.float32(ds * q - dm) - v
            acc[0, t] += e * e
            acc[1, t] += ds * q - v


@nb.njit(inline="always", **_JIT)
def _pack_scales_k4(out, off, ls, lm):
    """Write eight 6-bit scales and mins into the 12-byte Q4_K/Q5_K scales field at out[off:]."""
    for j in range(4):
        out[off + j] = np.uint8(ls[j] | ((ls[j + 4] >> 4) << 6))
        out[off + 4 + j] = np.uint8(lm[j] | ((lm[j + 4] >> 4) << 6))
        out[off + 8 + j] = np.uint8((ls[j + 4] & 15) | ((lm[j + 4] & 15) << 4))


@nb.njit(inline="always", **_JIT)
def _pack_affine(out, o, L, ls, lm, d_bit, dmin_bit, nbits):
    """One Q4_K/Q5_K super-block at out[o:]: f16 scales, packed 6-bit scales, codes L[256]."""
    out[o + 0] = np.uint8(d_bit & 255)
    out[o + 1] = np.uint8(d_bit >> 8)
    out[o + 2] = np.uint8(dmin_bit & 255)
    out[o + 3] = np.uint8(dmin_bit >> 8)
    _pack_scales_k4(out, o + 4, ls, lm)
    if nbits == 4:
        for k in range(4):
            for i in range(32):
                out[o + 16 + 32 * k + i] = L[64 * k + i] | (L[64 * k + 32 + i] << 4)
    else:
        for i in range(32):
            h = 0
            for j in range(8):
                h |= (L[32 * j + i] >> 4) << j
            out[o + 16 + i] = np.uint8(h)
        for k in range(4):
            for i in range(32):
                out[o + 48 + 32 * k + i] = (L[64 * k + i] & 15) | ((L[64 * k + 32 + i] & 15) << 4)


@nb.njit(parallel=True, **_LANES)
def encode_affine(x, scales, mins, d, dmin, d_bits, dmin_bits, nbits, out):
    """Pass 3 for Q4_K (nbits=4) and Q5_K (nbits=5).

    d, dmin float32 [R, S] are the f16-rounded super-block scales and d_bits,
    dmin_bits uint16 [R, S] their f16 encodings; out uint8 [R, S * block_bytes].

    Per sub-block, each integer scale c in c0-1..c0+1 (c0 the rounded fitted scale) runs
    a search for its best 6-bit min: try the centre m0 and its neighbours, move the centre
    to the least-squares min of the best codes so far (at most three rounds), stop when it
    stays. The (c, m) of least decoded error wins; the first of equals, in ascending order."""
    rows, cols = x.shape
    nmax = np.float32((1 << nbits) - 1)
    bb = 144 if nbits == 4 else 176
    J = cols // 32
    NS = 3 * J  # searches: (sub-block j, candidate scale j % 3)
    for r in nb.prange(rows):
        sd = np.empty(J, np.float32)
        sm = np.empty(J, np.float32)
        s_c = np.zeros(NS, np.int64)
        s_ds = np.zeros(NS, np.float32)
        s_run = np.zeros(NS, np.bool_)  # unfinished
        s_ok = np.zeros(NS, np.bool_)  # the candidate scale exists
        s_best = np.full(NS, np.inf)
        s_m = np.zeros(NS, np.int64)
        s_res = np.zeros(NS, np.float32)
        s_centre = np.zeros(NS, np.int64)
        s_tried = np.zeros(NS, np.int64)  # bit m: min m evaluated
        for j in range(J):
            sd[j] = d[r, j // 8]
            sm[j] = dmin[r, j // 8]
            c0 = 0 if sd[j] == 0.0 else int(min(np.rint(scales[r, j] / sd[j]), 63.0))
            m0 = 0 if sm[j] == 0.0 else int(min(np.rint(mins[r, j] / sm[j]), 63.0))
            for k in range(3):
                c = max(c0 - 1, 0) + k
                if c <= min(c0 + 1, 63):
                    q = 3 * j + k
                    s_c[q] = c
                    s_ds[q] = np.float32(sd[j] * np.float32(c))
                    s_ok[q] = True
                    s_run[q] = True
                    s_centre[q] = m0
        t_s = np.empty(3 * NS, np.int64)
        t_m = np.empty(3 * NS, np.int64)
        t_ds = np.empty(3 * NS, np.float32)
        t_dm = np.empty(3 * NS, np.float32)
        acc = np.empty((2, 3 * NS), np.float32)
        xg = np.empty((32, 3 * NS), np.float32)
        # round 1: every search tries its centre m0 and neighbours; the candidates of one
        # (scale, min) slot across all lanes read the row in place, with no gathering
        for i in range(32):
            for j in range(J):
                xg[i, j] = x[r, 32 * j + i]
        for k in range(9):
            for j in range(J):
                q = 3 * j + k // 3
                m = max(s_centre[q] - 1, 0) + k % 3
                t_ds[J + j] = s_ds[q]
                t_dm[J + j] = np.float32(sm[j] * np.float32(m))
            _evaluate(xg, t_ds[J:], t_dm[J:], acc, J, nmax)
            for j in range(J):
                q = 3 * j + k // 3
                m = max(s_centre[q] - 1, 0) + k % 3
                if s_run[q] and m <= min(s_centre[q] + 1, 63):
                    s_tried[q] |= np.int64(1) << m
                    if acc[0, j] < s_best[q]:
                        s_best[q] = acc[0, j]
                        s_m[q] = m
                        s_res[q] = acc[1, j]
        for _round in range(3):
            if _round > 0:
                T = 0
                for q in range(NS):
                    if not s_run[q]:
                        continue
                    j = q // 3
                    for m in range(max(s_centre[q] - 1, 0), min(s_centre[q] + 1, 63) + 1):
                        if s_tried[q] & (np.int64(1) << m):
                            continue
                        s_tried[q] |= np.int64(1) << m
                        t_s[T] = q
                        t_m[T] = m
                        t_ds[T] = s_ds[q]
                        t_dm[T] = np.float32(sm[j] * np.float32(m))
                        for i in range(32):
                            xg[i, T] = x[r, 32 * j + i]
                        T += 1
                if T == 0:
                    break
                _evaluate(xg, t_ds, t_dm, acc, T, nmax)
                for t in range(T):  # a search's candidates are in ascending m
                    q = t_s[t]
                    if acc[0, t] < s_best[q]:
                        s_best[q] = acc[0, t]
                        s_m[q] = t_m[t]
                        s_res[q] = acc[1, t]
            for q in range(NS):
                if not s_run[q]:
                    continue
                smj = sm[q // 3]
                nxt = 0 if smj == 0.0 else int(min(max(np.rint(s_res[q] / 32.0 / smj), 0.0), 63.0))
                if smj == 0.0 or nxt == s_centre[q]:
                    s_run[q] = False
                s_centre[q] = nxt
        ls = np.zeros(J, np.int64)
        lm = np.zeros(J, np.int64)
        L = np.empty(cols, np.uint8)
        for j in range(J):
            best = np.inf
            for k in range(3):
                q = 3 * j + k
                if s_ok[q] and s_best[q] < best:
                    best = s_best[q]
                    ls[j] = s_c[q]
                    lm[j] = s_m[q]
            ds = np.float32(sd[j] * np.float32(ls[j]))
            dm = np.float32(sm[j] * np.float32(lm[j]))
            for i in range(32):
                L[32 * j + i] = np.uint8(_affine_code(x[r, 32 * j + i], _inverse(ds), dm, nmax))
        for s in range(cols // QK_K):
            _pack_affine(out[r], s * bb, L[QK_K * s:], ls[8 * s:], lm[8 * s:], d_bits[r, s], dmin_bits[r, s], nbits)


@nb.njit(parallel=True, **_JIT)
def encode_q6_k(x, scales, d, d_bits, out):
    """Pass 3 for Q6_K: d float32 [R, S] (f16-rounded), d_bits uint16 [R, S], out uint8 [R, S * 210]."""
    rows, cols = x.shape
    for r in nb.prange(rows):
        L = np.empty(QK_K, np.uint8)
        Lt = np.empty(16, np.uint8)
        sc = np.empty(16, np.int64)
        for s in range(cols // QK_K):
            o = s * 210
            sd = d[r, s]
            for g in range(16):
                xb = QK_K * s + 16 * g
                c0 = 0 if sd == 0.0 else int(min(max(np.rint(scales[r, 16 * s + g] / sd), -128.0), 127.0))
                best = np.inf
                for c in range(max(c0 - 1, -128), min(c0 + 1, 127) + 1):
                    ds = np.float32(sd * np.float32(c))
                    err = 0.0
                    for i in range(16):
                        v = x[r, xb + i]
                        q = 0.0
                        if ds != 0.0:
                            q = min(max(np.rint(v / ds), -32.0), 31.0)
                        e = np.float32(ds * np.float32(q)) - v
                        err += e * e
                        Lt[i] = np.uint8(q + 32.0)
                    if err < best:
                        best = err
                        sc[g] = c
                        for i in range(16):
                            L[16 * g + i] = Lt[i]
            for h in range(2):
                for i in range(32):
                    q0 = L[128 * h + i]
                    q1 = L[128 * h + 32 + i]
                    q2 = L[128 * h + 64 + i]
                    q3 = L[128 * h + 96 + i]
                    out[r, o + 64 * h + i] = (q0 & 15) | ((q2 & 15) << 4)
                    out[r, o + 64 * h + 32 + i] = (q1 & 15) | ((q3 & 15) << 4)
                    out[r, o + 128 + 32 * h + i] = (q0 >> 4) | ((q1 >> 4) << 2) | ((q2 >> 4) << 4) | ((q3 >> 4) << 6)
            for g in range(16):
                out[r, o + 192 + g] = np.uint8(sc[g] & 255)
            out[r, o + 208] = np.uint8(d_bits[r, s] & 255)
            out[r, o + 209] = np.uint8(d_bits[r, s] >> 8)


# ---------------------------------------------------------------- drivers

def _to_f16(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Round float32 to f16 like the C code; returns (value as float32, f16 bits as uint16)."""
    h = v.astype(np.float16)
    return h.astype(np.float32), h.view(np.uint16)


def quantize_q4_k(x: np.ndarray) -> np.ndarray:
    return _quantize_affine(x, 4)


def quantize_q5_k(x: np.ndarray) -> np.ndarray:
    return _quantize_affine(x, 5)


def lane_rows(x: np.ndarray) -> np.ndarray:
    """x [R, C] viewed as [R*C // W, W] with W the widest of 4096..256 that divides it.

    Super-blocks are independent and contiguous, so the kernels may take any run of them as
    a "row": the same bytes come out. More sub-blocks a row means more lanes per loop, which
    the Q4_K/Q5_K kernels run measurably faster (12% from 1024 to 2048-4096 weights a row)."""
    n = x.size
    w = next((w for w in (4096, 2048, 1024, 512) if n % w == 0), x.shape[1])
    return x.reshape(n // w, w)


def _quantize_affine(x: np.ndarray, nbits: int) -> np.ndarray:
    shape = x.shape
    x = lane_rows(x)
    rows, cols = x.shape
    nsub = cols // 32
    scales = np.empty((rows, nsub), np.float32)
    mins = np.empty((rows, nsub), np.float32)
    if nbits == 4:
        fit_affine_subblocks(x, 15.0, -1.0, 0.1, 20, scales, mins)
    else:
        fit_affine_subblocks(x, 31.0, -0.5, 0.1, 15, scales, mins)
    sup = (rows, cols // QK_K, 8)
    d, d_bits = _to_f16(scales.reshape(sup).max(axis=2) / np.float32(63))
    dmin, dmin_bits = _to_f16(mins.reshape(sup).max(axis=2) / np.float32(63))
    out = np.empty((rows, cols // QK_K * (144 if nbits == 4 else 176)), np.uint8)
    encode_affine(x, scales, mins, d, dmin, d_bits, dmin_bits, nbits, out)
    return out.reshape(shape[0], shape[1] // QK_K * (144 if nbits == 4 else 176))


def quantize_q6_k(x: np.ndarray) -> np.ndarray:
    rows, cols = x.shape
    scales = np.empty((rows, cols // 16), np.float32)
    fit_symmetric_groups(x, scales)
    g = scales.reshape(rows, cols // QK_K, 16)
    pick = np.abs(g).argmax(axis=2)[..., None]
    smax = np.take_along_axis(g, pick, axis=2)[..., 0]
    # the scale of largest magnitude becomes the integer -128; -0.0 marks an all-zero block
    d, d_bits = _to_f16(smax / np.float32(-128))
    out = np.empty((rows, cols // QK_K * 210), np.uint8)
    encode_q6_k(x, scales, d, d_bits, out)
    return out
