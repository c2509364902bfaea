"""The GPU tier: the trunk's decode step on an NVIDIA card (numba-cuda), under a VRAM budget.

    layout     what VRAM holds and its sizes (no GPU needed: the placement uses it)
    ops        the block's small kernels: norms, RoPE, the KV store, attention, the router
    kv         the KV cache in VRAM, with the host's bookkeeping
    executor   one decode step: attention and FFN on the card, missed experts on the CPU

Importing this package imports no CUDA; `executor`, `kv` and `ops` do (numba.cuda).
"""
