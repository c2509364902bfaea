"""Numba quantizers for the K-quant formats Q4_K, Q5_K and Q6_K.

Shape legend
    R   rows of the matrix being quantized
    C   weights per row (a multiple of 256)
    S   super-blocks per row, C // 256
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
"""

from __future__ import annotations

import numba as nb
import numpy as np

from .formats import QK_K

_JIT = dict(cache=True, nogil=True)


# ---------------------------------------------------------------- pass 1: sub-block fits

@nb.njit(inline="always", **_JIT)
def _fit_affine(x, w, nmax, rmin, rdelta, nstep, L):
    """Fit x ~ a*L - m with integer L in [0, nmax] and m >= 0; returns (a, m).

    Weighted by w. Tries step sizes (nmax + rmin + rdelta*k) / (max - min) for
    k = 0..nstep, refits (a, m) by least squares for each rounding, and ends
    with one re-rounding step at the best fit. L is scratch [len(x)]."""
    n = x.shape[0]
    lo = min(0.0, x.min())
    hi = x.max()
    if hi == lo:
        return 0.0, -lo
    sw = 0.0
    sx = 0.0
    for i in range(n):
        sw += w[i]
        sx += w[i] * x[i]
    best_a = (hi - lo) / nmax
    best_b = lo
    best_err = 0.0
    for i in range(n):
        q = min(max(np.rint((x[i] - lo) / best_a), 0.0), nmax)
        e = best_a * q + lo - x[i]
        best_err += w[i] * e * e
    for k in range(nstep + 2):
        if k <= nstep:
            inv = (nmax + rmin + rdelta * k) / (hi - lo)
            off = lo
        else:  # final pass: re-round at the best fit so far
            if best_a <= 0.0:
                break
            inv = 1.0 / best_a
            off = best_b
        sl = 0.0
        sl2 = 0.0
        sxl = 0.0
        for i in range(n):
            q = min(max(np.rint((x[i] - off) * inv), 0.0), nmax)
            L[i] = q
            sl += w[i] * q
            sl2 += w[i] * q * q
            sxl += w[i] * q * x[i]
        det = sw * sl2 - sl * sl
        if det <= 0.0:
            continue
        a = (sw * sxl - sx * sl) / det
        b = (sl2 * sx - sl * sxl) / det
        if b > 0.0:  # the offset must not be positive: refit through zero
            b = 0.0
            a = sxl / sl2
        err = 0.0
        for i in range(n):
            e = a * L[i] + b - x[i]
            err += w[i] * e * e
        if err < best_err:
            best_err = err
            best_a = a
            best_b = b
    return best_a, -best_b


@nb.njit(parallel=True, **_JIT)
def fit_affine_subblocks(x, nmax, rmin, rdelta, nstep, scales, mins):
    """Pass 1 for Q4_K/Q5_K: scales, mins float32 [R, C // 32] (outputs)."""
    rows, cols = x.shape
    for r in nb.prange(rows):
        w = np.empty(32, np.float64)
        L = np.empty(32, np.float64)
        xs = np.empty(32, np.float64)
        for j in range(cols // 32):
            ss = 0.0
            for i in range(32):
                xs[i] = x[r, 32 * j + i]
                ss += xs[i] * xs[i]
            av = np.sqrt(ss / 32)
            for i in range(32):
                w[i] = av + abs(xs[i])  # large weights matter more, small ones still count
            a, m = _fit_affine(xs, w, nmax, rmin, rdelta, nstep, L)
            scales[r, j] = a
            mins[r, j] = m


@nb.njit(parallel=True, **_JIT)
def fit_symmetric_groups(x, scales):
    """Pass 1 for Q6_K: signed scale per 16-weight group, codes in [-32, 31]; scales [R, C // 16]."""
    rows, cols = x.shape
    for r in nb.prange(rows):
        for g in range(cols // 16):
            base = 16 * g
            vmax = 0.0
            amax = 0.0
            for i in range(16):
                v = x[r, base + i]
                if abs(v) > amax:
                    amax = abs(v)
                    vmax = v
            if amax < 1e-15:
                scales[r, g] = 0.0
                continue
            best_num = -1.0
            best_scale = 0.0
            for k in range(-9, 10):
                inv = -(32.0 + 0.1 * k) / vmax  # the largest weight lands near -32
                sxl = 0.0
                sl2 = 0.0
                for i in range(16):
                    v = x[r, base + i]
                    q = min(max(np.rint(inv * v), -32.0), 31.0)
                    wv = v * v
                    sxl += wv * v * q
                    sl2 += wv * q * q
                if sl2 > 0.0 and sxl * sxl > best_num * sl2:
                    best_num = sxl * sxl / sl2
                    best_scale = sxl / sl2
            scales[r, g] = best_scale


# ---------------------------------------------------------------- pass 3: integer scales and codes

@nb.njit(inline="always", **_JIT)
def _affine_codes(x, base, ds, dm, nmax, L):
    """Codes L[32] for x[base:base+32] at decoded scale ds and min dm; returns their squared error."""
    err = 0.0
    for i in range(32):
        v = x[base + i]
        q = 0.0
        if ds != 0.0:
            q = min(max(np.rint((v + dm) / ds), 0.0), nmax)
        e = np.float32(ds * np.float32(q) - dm) - v  # the decoder's float32 arithmetic
        err += e * e
        L[i] = np.uint8(q)
    return err


@nb.njit(inline="always", **_JIT)
def _search_min(x, base, ds, sm, m0, nmax, Lt, Lbest):
    """Best 6-bit min for one sub-block at scale ds: tries m0 and its neighbours, then
    twice the least-squares min of the best codes so far and its neighbours.
    Returns (squared error, integer min); Lbest[32] gets the codes."""
    best = np.inf
    best_m = 0
    centre = m0
    for it in range(3):
        for m in range(max(centre - 1, 0), min(centre + 1, 63) + 1):
            e = _affine_codes(x, base, ds, np.float32(sm * np.float32(m)), nmax, Lt)
            if e < best:
                best = e
                best_m = m
                for i in range(32):
                    Lbest[i] = Lt[i]
        if sm == 0.0:
            break
        resid = 0.0
        for i in range(32):
            resid += ds * np.float32(Lbest[i]) - x[base + i]
        nxt = int(min(max(np.rint(resid / 32.0 / sm), 0.0), 63.0))
        if nxt == centre:
            break
        centre = nxt
    return best, best_m


@nb.njit(inline="always", **_JIT)
def _pack_scales_k4(out, off, ls, lm):
    """Write eight 6-bit scales and mins into the 12-byte Q4_K/Q5_K scales field at out[off:]."""
    for j in range(4):
        out[off + j] = np.uint8(ls[j] | ((ls[j + 4] >> 4) << 6))
        out[off + 4 + j] = np.uint8(lm[j] | ((lm[j + 4] >> 4) << 6))
        out[off + 8 + j] = np.uint8((ls[j + 4] & 15) | ((lm[j + 4] & 15) << 4))


@nb.njit(parallel=True, **_JIT)
def encode_affine(x, scales, mins, d, dmin, d_bits, dmin_bits, nbits, out):
    """Pass 3 for Q4_K (nbits=4) and Q5_K (nbits=5).

    d, dmin float32 [R, S] are the f16-rounded super-block scales and d_bits,
    dmin_bits uint16 [R, S] their f16 encodings; out uint8 [R, S * block_bytes]."""
    rows, cols = x.shape
    nmax = float((1 << nbits) - 1)
    bb = 144 if nbits == 4 else 176
    for r in nb.prange(rows):
        L = np.empty(QK_K, np.uint8)
        Lt = np.empty(32, np.uint8)
        Lc = np.empty(32, np.uint8)
        ls = np.empty(8, np.int64)
        lm = np.empty(8, np.int64)
        for s in range(cols // QK_K):
            o = s * bb
            sd = d[r, s]
            sm = dmin[r, s]
            for j in range(8):
                c0 = 0 if sd == 0.0 else int(min(np.rint(scales[r, 8 * s + j] / sd), 63.0))
                m0 = 0 if sm == 0.0 else int(min(np.rint(mins[r, 8 * s + j] / sm), 63.0))
                best = np.inf
                xb = QK_K * s + 32 * j
                for c in range(max(c0 - 1, 0), min(c0 + 1, 63) + 1):
                    ds = np.float32(sd * np.float32(c))
                    e, m = _search_min(x[r], xb, ds, sm, m0, nmax, Lt, Lc)
                    if e < best:
                        best = e
                        ls[j] = c
                        lm[j] = m
                        for i in range(32):
                            L[32 * j + i] = Lc[i]
            out[r, o + 0] = np.uint8(d_bits[r, s] & 255)
            out[r, o + 1] = np.uint8(d_bits[r, s] >> 8)
            out[r, o + 2] = np.uint8(dmin_bits[r, s] & 255)
            out[r, o + 3] = np.uint8(dmin_bits[r, s] >> 8)
            _pack_scales_k4(out[r], o + 4, ls, lm)
            if nbits == 4:
                for k in range(4):
                    for i in range(32):
                        out[r, o + 16 + 32 * k + i] = L[64 * k + i] | (L[64 * k + 32 + i] << 4)
            else:
                for i in range(32):
                    h = 0
                    for j in range(8):
                        h |= (L[32 * j + i] >> 4) << j
                    out[r, o + 16 + i] = np.uint8(h)
                for k in range(4):
                    for i in range(32):
                        out[r, o + 48 + 32 * k + i] = (L[64 * k + i] & 15) | ((L[64 * k + 32 + i] & 15) << 4)


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


def _quantize_affine(x: np.ndarray, nbits: int) -> np.ndarray:
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
    return out


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
