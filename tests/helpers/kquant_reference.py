"""A plain numpy reference of stepstream's Q4_K/Q5_K quantizer, one sub-block at a time.

Written for the tests from the algorithm, not from the Numba lanes: every value is a numpy
float32 and every sum runs in element order (``np.cumsum``, never numpy's pairwise sums), so
the kernels must give the same bytes.

Pass 1 (per 32-weight sub-block): weights w = rms + |x|; the min-max fit, then the least-squares
(scale, min) of the rounding at each step size (nmax + rmin + rdelta*k) / (max - min), then of
the rounding at the best fit; the least weighted squared error wins, the first of equals.
Pass 2: the super-block's f16 scales, the largest fitted scale and min over 63.
Pass 3: for each 6-bit scale c0-1..c0+1, a search over 6-bit mins: the centre m0 and its
neighbours, then at most two moves of the centre to the mean residual of the best so far,
trying only mins not tried yet; error in the decoder's float32 arithmetic.
"""

from __future__ import annotations

import numpy as np

F = np.float32
STEPS = {4: (15.0, -1.0, 0.1, 20), 5: (31.0, -0.5, 0.1, 15)}  # nmax, rmin, rdelta, nstep


def ordered_sum(v: np.ndarray) -> np.ndarray:
    """Sum over the last axis, element after element, in float32."""
    return np.cumsum(v, axis=-1, dtype=F)[..., -1]


def fit(x: np.ndarray, nbits: int) -> tuple[np.ndarray, np.ndarray]:
    """Pass 1 over sub-blocks x float32 [N, 32]: (scale, min) float32 [N] each."""
    nmax, rmin, rdelta = (F(v) for v in STEPS[nbits][:3])
    nstep = STEPS[nbits][3]
    x = x.astype(F)
    rms = np.sqrt(ordered_sum(x * x) / F(32))
    w = rms[:, None] + np.abs(x)
    lo = np.minimum(x.min(axis=1), F(0))
    lo = np.where(lo < 0, lo, F(0))  # +0.0, never -0.0
    hi = x.max(axis=1)
    sw, sx = ordered_sum(w), ordered_sum(w * x)

    def error(a, b, q):
        e = (a[:, None] * q + b[:, None]) - x
        return ordered_sum((w * e) * e)

    def fit_codes(q):
        sl, sl2, sxl = ordered_sum(w * q), ordered_sum((w * q) * q), ordered_sum((w * q) * x)
        det = sw * sl2 - sl * sl
        a = (sw * sxl - sx * sl) / det
        b = (sl2 * sx - sl * sxl) / det
        through_zero = b > 0
        a = np.where(through_zero, sxl / sl2, a)
        b = np.where(through_zero, F(0), b)
        return a, b, det > 0

    with np.errstate(all="ignore"):
        best_a = (hi - lo) / nmax
        best_b = lo
        best_e = error(best_a, best_b, np.clip(np.rint((x - lo[:, None]) / best_a[:, None]), 0, nmax))
        for k in range(nstep + 1):
            inv = (nmax + rmin + rdelta * F(k)) / (hi - lo)
            q = np.clip(np.rint((x - lo[:, None]) * inv[:, None]), 0, nmax)
            a, b, ok = fit_codes(q)
            e = error(a, b, q)
            take = ok & (e < best_e)
            best_a, best_b, best_e = np.where(take, a, best_a), np.where(take, b, best_b), np.where(take, e, best_e)
        q = np.clip(np.rint((x - best_b[:, None]) * (F(1) / best_a)[:, None]), 0, nmax)
        a, b, ok = fit_codes(q)
        e = error(a, b, q)
        take = ok & (best_a > 0) & (e < best_e)
        best_a, best_b = np.where(take, a, best_a), np.where(take, b, best_b)
    flat = hi == lo
    return np.where(flat, F(0), best_a), np.where(flat, -lo, -best_b)


def _codes(v: np.ndarray, ds: np.float32, dm: np.float32, nmax: np.float32) -> np.ndarray:
    if ds == 0:
        return np.zeros_like(v)
    return np.clip(np.rint((v + dm) * (F(1) / ds)), F(0), nmax)


def _search(v, sd, sm, c, m0, nmax):
    """Best (error, min) of 6-bit scale c over mins found from m0, and the residual."""
    ds = F(sd * F(c))
    tried, best = set(), (np.inf, 0, 0.0)

    def evaluate(centre):
        nonlocal best
        for m in range(max(centre - 1, 0), min(centre + 1, 63) + 1):
            if m in tried:
                continue
            tried.add(m)
            dm = F(sm * F(m))
            q = _codes(v, ds, dm, nmax)
            err = ordered_sum(np.square((ds * q - dm).astype(F) - v))
            if err < best[0]:
                best = (err, m, ordered_sum(ds * q - v))

    centre = m0
    evaluate(centre)
    for _ in range(2):
        nxt = 0 if sm == 0 else int(min(max(np.rint(float(best[2]) / 32.0 / float(sm)), 0.0), 63.0))
        if sm == 0 or nxt == centre:
            break
        centre = nxt
        evaluate(centre)
    return best[0], best[1]


def quantize(x: np.ndarray, nbits: int) -> np.ndarray:
    """Q4_K (nbits 4) or Q5_K (5) bytes of float32 x [R, C], C a multiple of 256."""
    rows, cols = x.shape
    nmax = F((1 << nbits) - 1)
    sub = x.reshape(-1, 32)
    scales, mins = fit(sub, nbits)
    scales, mins = scales.reshape(rows, -1, 8), mins.reshape(rows, -1, 8)
    d = (scales.max(axis=2) / F(63)).astype(np.float16)
    dmin = (mins.max(axis=2) / F(63)).astype(np.float16)
    blocks = []
    for r in range(rows):
        for s in range(cols // 256):
            sd, sm = F(d[r, s]), F(dmin[r, s])
            ls, lm, L = [], [], []
            for j in range(8):
                v = x[r, 256 * s + 32 * j:256 * s + 32 * j + 32].astype(F)
                c0 = 0 if sd == 0 else int(min(np.rint(scales[r, s, j] / sd), 63.0))
                m0 = 0 if sm == 0 else int(min(np.rint(mins[r, s, j] / sm), 63.0))
                found = [(_search(v, sd, sm, c, m0, nmax), c) for c in range(max(c0 - 1, 0), min(c0 + 1, 63) + 1)]
                (_, m), c = min(found, key=lambda t: t[0][0])  # min() keeps the first of equals
                ls.append(c)
                lm.append(m)
                L.append(_codes(v, F(sd * F(c)), F(sm * F(m)), nmax).astype(np.uint8))
            blocks.append(_pack(d[r, s], dmin[r, s], ls, lm, np.concatenate(L), nbits))
    return np.array(blocks, np.uint8).reshape(rows, -1)


def _pack(d, dmin, ls, lm, L, nbits) -> list[int]:
    head = np.array([d, dmin], np.float16).view(np.uint8).tolist()
    sc = [ls[j] | ((ls[j + 4] >> 4) << 6) for j in range(4)]
    sc += [lm[j] | ((lm[j + 4] >> 4) << 6) for j in range(4)]
    sc += [(ls[j + 4] & 15) | ((lm[j + 4] & 15) << 4) for j in range(4)]
    low = [(int(L[64 * k + i]) & 15) | ((int(L[64 * k + 32 + i]) & 15) << 4) for k in range(4) for i in range(32)]
    if nbits == 4:
        return head + sc + low
    high = [sum(((int(L[32 * j + i]) >> 4) & 1) << j for j in range(8)) for i in range(32)]
    return head + sc + high + low
