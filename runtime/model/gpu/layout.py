"""What the GPU tier holds in VRAM, and where: computed from the weights alone, no GPU needed.

VRAM holds one byte arena and a few float32 arrays:
    arena   [ resident matrices | expert slot 0 | expert slot 1 | ... ]     uint8
            resident: per trunk block q, k, v, gate, o; the dense FFN or the shared expert;
            the router when it is quantized; then the output head. Each starts on a
            256-byte boundary. An expert slot holds one routed expert's gate, up and down
            rows back to back, each matrix starting on a multiple of 4 bytes.
    vectors norms, float32 routers and router biases, RoPE speeds
    KV cache float32 keys and values per trunk block (runtime.model.gpu.kv)
The placement (offload.gpu_placement) sizes the slots from a budget with these numbers;
the executor (runtime.model.gpu.executor) allocates and fills them.

Shape legend:  H hidden  E experts  I expert FFN width  V vocab
"""

from __future__ import annotations

from dataclasses import dataclass

from gguf import GGMLQuantizationType as Q

from runtime.base.config import ModelConfig
from runtime.base.errors import StepstreamError
from runtime.model.matrix import Matrix
from runtime.model.weights import ModelWeights

GPU_FORMATS = (Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.Q8_0)  # quant.cuda_kernels.FORMATS, without importing numba.cuda
ALIGN = 256


def aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


@dataclass(frozen=True)
class ResidentLayout:
    """Byte offsets of the resident matrices in the arena, by id(Matrix)."""
    offsets: dict[int, int]
    matrix_bytes: int  # the resident part of the arena
    vector_bytes: int  # norms, float32 routers, biases


def _check(m: Matrix, what: str) -> None:
    if m.qtype not in GPU_FORMATS or m.shape[1] % 256:
        raise StepstreamError(
            f"the GPU tier cannot run {what} ({m.name}: {m.qtype.name} [{m.shape[0]}, {m.shape[1]}]); it runs "
            f"{', '.join(q.name for q in GPU_FORMATS)} with a multiple of 256 columns")


def gpu_matrices(weights: ModelWeights, cfg: ModelConfig) -> list[tuple[str, Matrix]]:
    """The quantized matrices the GPU holds, in arena order; raises on one it cannot run."""
    out = []
    for i, b in enumerate(weights.blocks[: cfg.n_layers]):
        parts = [("q", b.q), ("k", b.k), ("v", b.v), ("gate", b.gate), ("o", b.o)]
        ffn = b.dense if b.router is None else b.shared
        parts += [("ffn gate", ffn.gate), ("ffn up", ffn.up), ("ffn down", ffn.down)]
        if b.router is not None and b.router.qtype != Q.F32:
            parts.append(("router", b.router))
        out += [(f"block {i} {n}", m) for n, m in parts]
    out.append(("the output head", weights.output))
    for what, m in out:
        _check(m, what)
    return out


def resident_layout(weights: ModelWeights, cfg: ModelConfig) -> ResidentLayout:
    offsets, at = {}, 0
    for _, m in gpu_matrices(weights, cfg):
        if id(m) not in offsets:  # a tied head is the embedding: once
            offsets[id(m)] = at
            at += aligned(m.nbytes)
    vec = 0
    for b in weights.blocks[: cfg.n_layers]:
        vec += 4 * (2 * cfg.hidden + 2 * cfg.head_dim)
        if b.router is not None:
            vec += 4 * cfg.n_expert * (1 + (cfg.hidden if b.router.qtype == Q.F32 else 0))
    return ResidentLayout(offsets, at, vec + 4 * cfg.hidden)


def word_aligned(n: int) -> int:
    """n rounded up to a multiple of 4: where the next matrix of an expert slot starts (the
    kernels read matrices as words)."""
    return (n + 3) // 4 * 4


def expert_slot_bytes(cfg: ModelConfig, expert_bytes: int) -> int:
    """One slot: a routed expert's three matrices, each starting on a word, 256-byte aligned."""
    return aligned(expert_bytes + 12)


def kv_bytes(cfg: ModelConfig, n_ctx: int, ring: int) -> int:
    """Float32 keys and values of every trunk block at a full context; ring slots on sliding blocks."""
    return sum(2 * 4 * (ring if cfg.sliding[i] else n_ctx) * cfg.n_head_kv[i] * cfg.head_dim
               for i in range(cfg.n_layers))


def scratch_bytes(cfg: ModelConfig, n_ctx: int) -> int:
    """Decode buffers: attention scores over a full context, activations, the FFN's intermediates."""
    nh = max(cfg.n_head[: cfg.n_layers])
    scores = 4 * nh * n_ctx
    ffn = (1 + cfg.n_expert_used) * max(cfg.expert_ffn, cfg.shared_ffn, cfg.dense_ffn) * 16
    return scores + ffn + 4 * cfg.vocab + 64 * cfg.hidden + (1 << 20)
