"""Numba quantizers for the 2- and 3-bit K-quant formats Q2_K and Q3_K.

Shape legend
    R   rows of the matrix being quantized
    C   weights per row (a multiple of 256)
    S   super-blocks per row, C // 256
    G   16-weight sub-blocks per row, C // 16 (both formats scale 16 weights at a time)
    x   float32 [R, C]   the weights
    out uint8   [R, S * block_bytes]   GGUF bytes (84 for Q2_K, 110 for Q3_K)

Formats (quant.formats has the byte layouts):
    Q2_K  w = d * sc_g * q - dmin * m_g,   q in 0..3,   sc_g, m_g in 0..15, d and dmin f16
    Q3_K  w = d * sc_g * q,                q in -4..3,  sc_g in -32..31,    d f16

Both are quantized in the three passes quant.kquant uses for Q4_K..Q6_K:
  1. fit a real (scale, min) (Q2_K) or scale (Q3_K) to every sub-block: try a grid of step
     sizes, round, and refit by least squares to the codes each rounding gives;
  2. derive the super-block's f16 scale(s) from the largest fitted values (numpy, which
     rounds to f16 exactly as the C code does);
  3. pick each sub-block's integer scale (and min) by the error of the *decoded* weights,
     in the decoder's float32 arithmetic, over a neighbourhood of the rounded fitted values,
     then write the codes.

Why they differ from llama.cpp's reference quantizers (quantize_row_q2_K_ref, _q3_K_ref,
which `llama-quantize` runs without an importance matrix). Those fit Q2_K sub-blocks by
weighted absolute error and Q3_K ones with weights x^2, then round the integer scales
once. Both are about outliers rather than the mean error. At two and three bits a
sub-block has four or eight levels, and which integer scale is best depends on where
the sixteen weights fall between the levels, so rounding the fitted scale is often one
step off. Here pass 1 minimises squared error (weights rms + |x|, so large weights count
more and small ones still count) and pass 3 tries the neighbouring integers against the
exact decoded result. tests/test_kquant_q2q3.py compares RMSE with ggml's quantizer.
"""

from __future__ import annotations

import numba as nb
import numpy as np

from .formats import QK_K

_JIT = dict(cache=True, nogil=True)
_LANES = dict(cache=True, nogil=True, error_model="numpy")

Q2_K_BYTES = 84
Q3_K_BYTES = 110


# ---------------------------------------------------------------- pass 1: sub-block fits

@nb.njit(parallel=True, **_LANES)
def fit_affine16(x, nstep, rmin, rdelta, scales, mins):
    """Pass 1 for Q2_K: scale a > 0 and min m >= 0 of x ~ a*q - m per 16-weight sub-block,
    codes q in 0..3; scales, mins float32 [R, G] (outputs).

    Step sizes (3 + rmin + rdelta*k) / (max - min), k = 0..nstep, each rounded and refitted
    by weighted least squares (weights rms + |x|); the fit of least weighted squared error
    wins, after one last re-rounding at the winner. The error of a fit comes from the sums
    the fit is made of, so each candidate is one pass over the weights. Lanes: the row's
    sub-blocks side by side, as in fit_symmetric16 (a flat lane's arithmetic divides by zero
    and is discarded)."""
    rows, cols = x.shape
    G = cols // 16
    for r in nb.prange(rows):
        xt = np.empty((16, G), np.float64)
        w = np.empty((16, G), np.float64)
        st = np.zeros((14, G), np.float64)
        ss, lo, hi, sw, sx, sx2, ba, bb, be = st[0], st[1], st[2], st[3], st[4], st[5], st[6], st[7], st[8]
        inv, off, sl, sl2, sxl = st[9], st[10], st[11], st[12], st[13]
        for i in range(16):
            for g in range(G):
                v = np.float64(x[r, 16 * g + i])
                xt[i, g] = v
                ss[g] += v * v
        for g in range(G):
            ss[g] = np.sqrt(ss[g] / 16)
            lo[g] = xt[0, g]
            hi[g] = xt[0, g]
        for i in range(16):
            for g in range(G):
                v = xt[i, g]
                w[i, g] = ss[g] + abs(v)
                sw[g] += w[i, g]
                sx[g] += w[i, g] * v
                sx2[g] += w[i, g] * v * v
                lo[g] = min(lo[g], v)
                hi[g] = max(hi[g], v)
        for g in range(G):
            lo[g] = min(lo[g], 0.0)
            ba[g] = (hi[g] - lo[g]) / 3.0  # the min-max fit is the first best
            bb[g] = lo[g]
        for i in range(16):
            for g in range(G):
                v = xt[i, g]
                q = min(max(np.rint((v - lo[g]) / ba[g]), 0.0), 3.0)
                e = ba[g] * q + bb[g] - v
                be[g] += w[i, g] * e * e
        for k in range(nstep + 2):
            for g in range(G):
                if k <= nstep:
                    inv[g] = (3.0 + rmin + rdelta * k) / (hi[g] - lo[g])
                    off[g] = lo[g]
                else:  # re-round at the best fit so far
                    inv[g] = 1.0 / ba[g]
                    off[g] = bb[g]
                sl[g] = 0.0
                sl2[g] = 0.0
                sxl[g] = 0.0
            for i in range(16):
                for g in range(G):
                    v = xt[i, g]
                    q = min(max(np.rint((v - off[g]) * inv[g]), 0.0), 3.0)
                    sl[g] += w[i, g] * q
                    sl2[g] += w[i, g] * q * q
                    sxl[g] += w[i, g] * q * v
            for g in range(G):
                det = sw[g] * sl2[g] - sl[g] * sl[g]
                a = (sw[g] * sxl[g] - sx[g] * sl[g]) / det
                b = (sl2[g] * sx[g] - sl[g] * sxl[g]) / det
                if b > 0.0:  # the offset may not be positive: refit through zero
                    b = 0.0
                    a = sxl[g] / sl2[g]
                # sum w (a q + b - v)^2, expanded over the sums
                err = a * a * sl2[g] + 2.0 * a * b * sl[g] + b * b * sw[g] - 2.0 * a * sxl[g] - 2.0 * b * sx[g] + sx2[g]
                if det > 0.0 and a > 0.0 and err < be[g]:
                    be[g] = err
                    ba[g] = a
                    bb[g] = b
        for g in range(G):
            flat = hi[g] <= lo[g]
            scales[r, g] = 0.0 if flat else ba[g]
            mins[r, g] = -lo[g] if flat else -bb[g]


@nb.njit(parallel=True, **_LANES)
def fit_symmetric16(x, scales):
    """Pass 1 for Q3_K: signed scale per 16-weight sub-block, codes in -4..3; scales [R, G].

    Step sizes put the sub-block's largest-magnitude weight near -4 (its sign picks the side
    with the extra level); each is refitted by least squares (weights rms + |x|) and the one
    explaining most of x wins. Lanes: the row's sub-blocks side by side (weight i of sub-block
    g at [i, g]), each with its own sums in its own order, so LLVM vectorizes across them."""
    rows, cols = x.shape
    G = cols // 16
    for r in nb.prange(rows):
        xt = np.empty((16, G), np.float64)
        w = np.empty((16, G), np.float64)
        st = np.zeros((7, G), np.float64)
        amax, vmax, ss, inv, sxl, sl2, best = st[0], st[1], st[2], st[3], st[4], st[5], st[6]
        bs = np.zeros(G, np.float64)
        for i in range(16):
            for g in range(G):
                v = np.float64(x[r, 16 * g + i])
                xt[i, g] = v
                ss[g] += v * v
                big = abs(v) > amax[g]  # the first of equal magnitudes
                vmax[g] = v if big else vmax[g]
                amax[g] = abs(v) if big else amax[g]
        for g in range(G):
            ss[g] = np.sqrt(ss[g] / 16)
            best[g] = -1.0
        for i in range(16):
            for g in range(G):
                w[i, g] = ss[g] + abs(xt[i, g])
        for k in range(-12, 13):
            for g in range(G):
                inv[g] = -(4.0 + 0.1 * k) / vmax[g]
                sxl[g] = 0.0
                sl2[g] = 0.0
            for i in range(16):
                for g in range(G):
                    q = min(max(np.rint(inv[g] * xt[i, g]), -4.0), 3.0)
                    sxl[g] += w[i, g] * xt[i, g] * q
                    sl2[g] += w[i, g] * q * q
            for g in range(G):
                if sl2[g] > 0.0 and sxl[g] * sxl[g] > best[g] * sl2[g]:
                    best[g] = sxl[g] * sxl[g] / sl2[g]
                    bs[g] = sxl[g] / sl2[g]
        for g in range(G):
            scales[r, g] = 0.0 if amax[g] < 1e-15 else bs[g]


# ---------------------------------------------------------------- pass 3: integer scales and codes

@nb.njit(inline="always", **_JIT)
def _q2_code(v, ds, dm):
    """The Q2_K code of weight v at decoded scale ds and min dm (0 when ds is 0)."""
    if ds == 0.0:
        return 0.0
    return min(max(np.rint((v + dm) / ds), 0.0), 3.0)


@nb.njit(inline="always", **_JIT)
def _pack_crumbs(out, o, L):
    """Codes L[256] (0..3) as the 64 bytes at out[o:]: weight 128h + 32k + l sits in bits 2k of byte 32h + l."""
    for h in range(2):
        for l in range(32):
            b = 128 * h + l
            out[o + 32 * h + l] = L[b] | (L[b + 32] << 2) | (L[b + 64] << 4) | (L[b + 96] << 6)


@nb.njit(parallel=True, **_JIT)
def encode_q2_k(x, scales, mins, d, dmin, d_bits, dmin_bits, radius, out):
    """Pass 3 for Q2_K: d, dmin float32 [R, S] (f16-rounded), d_bits, dmin_bits uint16 [R, S],
    out uint8 [R, S * 84].

    Each sub-block tries every integer scale within `radius` of its rounded fitted scale and
    every min within `radius` of its rounded fitted min (4-bit both), and keeps the pair whose
    decoded weights are closest to x: the first of equals, in ascending order."""
    rows, cols = x.shape
    for r in nb.prange(rows):
        L = np.empty(QK_K, np.uint8)
        for s in range(cols // QK_K):
            o = s * Q2_K_BYTES
            sd = d[r, s]
            sm = dmin[r, s]
            for g in range(16):
                xb = QK_K * s + 16 * g
                c0 = 0 if sd == 0.0 else int(min(np.rint(scales[r, 16 * s + g] / sd), 15.0))
                m0 = 0 if sm == 0.0 else int(min(np.rint(mins[r, 16 * s + g] / sm), 15.0))
                best = np.inf
                bc = 0
                bm = 0
                for c in range(max(c0 - radius, 0), min(c0 + radius, 15) + 1):
                    ds = np.float32(sd * np.float32(c))
                    for m in range(max(m0 - radius, 0), min(m0 + radius, 15) + 1):
                        dm = np.float32(sm * np.float32(m))
                        err = 0.0
                        for i in range(16):
                            v = x[r, xb + i]
                            q = np.float32(_q2_code(v, ds, dm))
                            e = np.float32(np.float32(ds * q) - dm) - v
                            err += e * e
                        if err < best:
                            best = err
                            bc = c
                            bm = m
                ds = np.float32(sd * np.float32(bc))
                dm = np.float32(sm * np.float32(bm))
                for i in range(16):
                    L[16 * g + i] = np.uint8(_q2_code(x[r, xb + i], ds, dm))
                out[r, o + g] = np.uint8(bc | (bm << 4))
            _pack_crumbs(out[r], o + 16, L)
            out[r, o + 80] = np.uint8(d_bits[r, s] & 255)
            out[r, o + 81] = np.uint8(d_bits[r, s] >> 8)
            out[r, o + 82] = np.uint8(dmin_bits[r, s] & 255)
            out[r, o + 83] = np.uint8(dmin_bits[r, s] >> 8)


@nb.njit(parallel=True, **_JIT)
def encode_q3_k(x, scales, d, d_bits, radius, out):
    """Pass 3 for Q3_K: d float32 [R, S] (f16-rounded), d_bits uint16 [R, S], out uint8 [R, S * 110].

    Each sub-block tries every integer scale within `radius` of its rounded fitted scale
    (-32..31) and keeps the one whose decoded weights are closest to x."""
    rows, cols = x.shape
    for r in nb.prange(rows):
        L = np.empty(QK_K, np.uint8)  # code + 4, 0..7
        Lt = np.empty(16, np.uint8)
        for s in range(cols // QK_K):
            o = s * Q3_K_BYTES
            sd = d[r, s]
            for k in range(12):
                out[r, o + 96 + k] = 0
            for g in range(16):
                xb = QK_K * s + 16 * g
                c0 = 0 if sd == 0.0 else int(min(max(np.rint(scales[r, 16 * s + g] / sd), -32.0), 31.0))
                best = np.inf
                bc = 0
                for c in range(max(c0 - radius, -32), min(c0 + radius, 31) + 1):
                    ds = np.float32(sd * np.float32(c))
                    err = 0.0
                    for i in range(16):
                        v = x[r, xb + i]
                        q = 0.0
                        if ds != 0.0:
                            q = min(max(np.rint(v / ds), -4.0), 3.0)
                        e = np.float32(ds * np.float32(q)) - v
                        err += e * e
                        Lt[i] = np.uint8(q + 4.0)
                    if err < best:
                        best = err
                        bc = c
                        for i in range(16):
                            L[16 * g + i] = Lt[i]
                u = bc + 32
                if g < 8:
                    out[r, o + 96 + g] |= np.uint8(u & 15)
                else:
                    out[r, o + 96 + g - 8] |= np.uint8((u & 15) << 4)
                out[r, o + 104 + g % 4] |= np.uint8((u >> 4) << (2 * (g // 4)))
            for k in range(32):
                out[r, o + k] = 0
            for i in range(QK_K):  # the high bit of code i (set when code >= 0) goes to hmask[i % 32], bit i // 32
                if L[i] > 3:
                    out[r, o + i % 32] |= np.uint8(1 << (i // 32))
                    L[i] -= 4
            _pack_crumbs(out[r], o + 32, L)
            out[r, o + 108] = np.uint8(d_bits[r, s] & 255)
            out[r, o + 109] = np.uint8(d_bits[r, s] >> 8)


# ---------------------------------------------------------------- drivers

def _to_f16(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Round float32 to f16 like the C code; returns (value as float32, f16 bits as uint16)."""
    h = v.astype(np.float16)
    return h.astype(np.float32), h.view(np.uint16)


def quantize_q2_k(x: np.ndarray) -> np.ndarray:
    """GGUF Q2_K bytes uint8 [R, C // 256 * 84] of float32 x [R, C] (C a multiple of 256)."""
    rows, cols = x.shape
    scales = np.empty((rows, cols // 16), np.float32)
    mins = np.empty((rows, cols // 16), np.float32)
    fit_affine16(x, 15, -0.5, 0.1, scales, mins)
    sup = (rows, cols // QK_K, 16)
    d, d_bits = _to_f16(scales.reshape(sup).max(axis=2) / np.float32(15))
    dmin, dmin_bits = _to_f16(mins.reshape(sup).max(axis=2) / np.float32(15))
    out = np.empty((rows, cols // QK_K * Q2_K_BYTES), np.uint8)
    encode_q2_k(x, scales, mins, d, dmin, d_bits, dmin_bits, 1, out)
    return out


def quantize_q3_k(x: np.ndarray) -> np.ndarray:
    """GGUF Q3_K bytes uint8 [R, C // 256 * 110] of float32 x [R, C] (C a multiple of 256)."""
    rows, cols = x.shape
    scales = np.empty((rows, cols // 16), np.float32)
    fit_symmetric16(x, scales)
    g = scales.reshape(rows, cols // QK_K, 16)
    pick = np.abs(g).argmax(axis=2)[..., None]
    smax = np.take_along_axis(g, pick, axis=2)[..., 0]
    d, d_bits = _to_f16(smax / np.float32(-32))  # the scale of largest magnitude becomes -32
    out = np.empty((rows, cols // QK_K * Q3_K_BYTES), np.uint8)
    encode_q3_k(x, scales, d, d_bits, 1, out)
    return out
