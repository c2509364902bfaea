"""The fused FFN call's descriptor rows, built on the card when every routed expert is in VRAM.

With every expert resident, a MoE block needs nothing from the host: the router's ids pick
rows of a per-layer table of slot descriptors, so no copy and no synchronisation stand
between one block and the next.

Shape legend:  K experts per token  E experts per layer
    ids int32 [1, K]  wts float32 [1, K]  table int64 [E, 3, 4] (gate, up, down descriptors)
    shared int64 [1, 3, 4]  desc int64 [>= 1 + K, 3, 4]  w, lim float32 [>= 1 + K]
"""

from __future__ import annotations

import numba
from numba import cuda


@cuda.jit
def _gather(ids, wts, table, shared, limit_shared, limit, desc, w, lim):
    f = cuda.grid(1)
    k = ids.shape[1]
    if f > k:
        return
    if f == 0:
        for a in range(3):
            for b in range(4):
                desc[0, a, b] = shared[0, a, b]
        w[0] = numba.float32(1.0)
        lim[0] = limit_shared
        return
    e = ids[0, f - 1]
    for a in range(3):
        for b in range(4):
            desc[f, a, b] = table[e, a, b]
    w[f] = wts[0, f - 1]
    lim[f] = limit


def gather_ffn_rows(ids, wts, table, shared, limit_shared: float, limit: float, desc, w, lim, stream=0) -> None:
    """desc[0] = shared[0], desc[1 + j] = table[ids[0, j]]; weights 1 then wts; clamps to match."""
    k = ids.shape[1]
    if desc.shape[0] < 1 + k or w.shape[0] < 1 + k or lim.shape[0] < 1 + k:
        raise ValueError(f"gather_ffn_rows: outputs hold {desc.shape[0]} rows, {1 + k} are needed")
    _gather[(k + 32) // 32, 32, stream](ids, wts, table, shared, numba.float32(limit_shared), numba.float32(limit), desc, w, lim)
