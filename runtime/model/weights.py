"""Binding GGUF tensors to the model's parts, each checked against the config's shapes.

Matrices stay views of the mapped file; small vectors (norms, router bias) are copied to
float32. Routed experts are not held here: they go to the expert provider.

Shape legend (numpy order):  H hidden  V vocab  D head dim  Nh/Nk heads
    F dense FFN  E experts  I expert FFN  S shared FFN
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

import quant
from runtime.base import gguf_schema as N
from runtime.base.config import ModelConfig
from runtime.base.errors import StepstreamError
from runtime.base.gguf_file import GGUFModelFile
from runtime.model.matrix import Matrix, ffn_descriptor, matrix, stacked, vector


@dataclass(frozen=True)
class FFN:
    """A SwiGLU FFN: a dense MLP, a shared expert or one routed expert."""

    gate: Matrix  # [F, H]
    up: Matrix  # [F, H]
    down: Matrix  # [H, F]

    @cached_property
    def nbytes(self) -> int:
        return self.gate.nbytes + self.up.nbytes + self.down.nbytes

    @cached_property
    def descriptor(self):
        """For the fused decode kernel (runtime.model.matrix.ffn_descriptor); computed once."""
        return ffn_descriptor(self.gate, self.up, self.down)


@dataclass(frozen=True)
class BlockWeights:
    attn_norm: np.ndarray  # [H]
    q: Matrix  # [Nh*D, H]
    k: Matrix  # [Nk*D, H]
    v: Matrix  # [Nk*D, H]
    o: Matrix  # [H, Nh*D]
    q_norm: np.ndarray  # [D]
    k_norm: np.ndarray  # [D]
    gate: Matrix  # [Nh, H], head-wise output gate
    ffn_norm: np.ndarray  # [H]
    dense: FFN | None  # dense blocks
    router: Matrix | None  # [E, H], MoE blocks
    router_bias: np.ndarray | None  # [E]
    shared: FFN | None  # [S, H] / [H, S]


@dataclass(frozen=True)
class NextNWeights:
    eh_proj: Matrix  # [H, 2H]
    enorm: np.ndarray  # [H]
    hnorm: np.ndarray  # [H]
    head_norm: np.ndarray  # [H]
    head: Matrix  # [V, H]


@dataclass(frozen=True)
class ModelWeights:
    embed: Matrix  # [V, H]
    out_norm: np.ndarray  # [H]
    output: Matrix  # [V, H]
    rope_factors: np.ndarray | None  # [D/2], llama3 scaling of full-attention blocks
    blocks: list[BlockWeights]  # trunk, then MTP blocks when present
    nextn: list[NextNWeights]  # one per MTP block present (empty for a trunk-only file)


def _ffn(f: GGUFModelFile, i: int, names: tuple[str, str, str], width: int, H: int) -> FFN:
    g, u, d = (f.tensor(N.blk(i, n)) for n in names)
    return FFN(matrix(g, (width, H)), matrix(u, (width, H)), matrix(d, (H, width)))


def _block(f: GGUFModelFile, cfg: ModelConfig, i: int) -> BlockWeights:
    H, D, nh, nk = cfg.hidden, cfg.head_dim, cfg.n_head[i], cfg.n_head_kv[i]

    def t(name):
        return f.tensor(N.blk(i, name))

    moe = cfg.moe[i]  # agreeing with the block's tensors (tensor_shapes.check_block_kinds)
    bias_name = N.blk(i, N.ROUTER_BIAS)
    return BlockWeights(
        attn_norm=vector(t(N.ATTN_NORM), H),
        q=matrix(t(N.ATTN_Q), (nh * D, H)),
        k=matrix(t(N.ATTN_K), (nk * D, H)),
        v=matrix(t(N.ATTN_V), (nk * D, H)),
        o=matrix(t(N.ATTN_OUTPUT), (H, nh * D)),
        q_norm=vector(t(N.ATTN_Q_NORM), D),
        k_norm=vector(t(N.ATTN_K_NORM), D),
        gate=matrix(t(N.ATTN_GATE), (nh, H)),
        ffn_norm=vector(t(N.FFN_NORM), H),
        dense=None if moe else _ffn(f, i, N.DENSE, cfg.dense_ffn, H),
        router=matrix(t(N.ROUTER), (cfg.n_expert, H)) if moe else None,
        router_bias=_finite(vector(f.tensors[bias_name], cfg.n_expert), f.tensors[bias_name])
        if moe and bias_name in f.tensors else None,
        shared=_ffn(f, i, N.SHARED, cfg.shared_ffn, H) if moe else None,
    )


def _finite(v: np.ndarray, ref) -> np.ndarray:
    """A router's selection bias, refused at load when not finite: it only chooses experts, so a
    NaN there never reaches the hidden states that the check after each evaluation reads (a
    review: it ran, with other experts than llama.cpp's)."""
    bad = np.flatnonzero(~np.isfinite(v))
    if bad.size:
        raise StepstreamError(f"{ref.path}: tensor {ref.name!r} holds {v[bad[0]]} at entry {bad[0]} "
                              f"({bad.size} non-finite values); the router's bias must be finite")
    return v


def expert_bank(f: GGUFModelFile, cfg: ModelConfig, i: int) -> list[FFN]:
    """The E routed experts of block i, each a set of contiguous slices of the file."""
    E, I, H = cfg.n_expert, cfg.expert_ffn, cfg.hidden
    g, u, d = (f.tensor(N.blk(i, n)) for n in N.EXPERTS)
    return [FFN(*m) for m in zip(stacked(g, (E, I, H)), stacked(u, (E, I, H)), stacked(d, (E, H, I)))]


def _nextn(f: GGUFModelFile, cfg: ModelConfig, i: int, out_norm, output) -> NextNWeights:
    H = cfg.hidden
    head_norm = N.blk(i, N.NEXTN_HEAD_NORM)
    head = N.blk(i, N.NEXTN_HEAD)
    return NextNWeights(
        eh_proj=matrix(f.tensor(N.blk(i, N.NEXTN_EH_PROJ)), (H, 2 * H)),
        enorm=vector(f.tensor(N.blk(i, N.NEXTN_ENORM)), H),
        hnorm=vector(f.tensor(N.blk(i, N.NEXTN_HNORM)), H),
        head_norm=vector(f.tensors[head_norm], H) if head_norm in f.tensors else out_norm,
        head=matrix(f.tensors[head], (cfg.vocab, H)) if head in f.tensors else output,
    )


def check_formats(f: GGUFModelFile) -> None:
    """Refuse a file holding any tensor in a format the kernels lack (quant.FORMATS), before
    anything is bound: one line, naming the first such tensor and every such format."""
    bad = [t for t in f.tensors.values() if t.qtype not in quant.FORMATS]
    if not bad:
        return
    kinds = ", ".join(sorted({t.qtype.name for t in bad}))
    raise StepstreamError(f"{bad[0].path}: tensor {bad[0].name!r} is stored as {bad[0].qtype.name}, a format stepstream "
                          f"cannot run ({len(bad)} tensors of this file are in {kinds}); it runs "
                          f"{', '.join(q.name for q in quant.FORMATS)}")


def load_weights(f: GGUFModelFile, cfg: ModelConfig) -> ModelWeights:
    check_formats(f)
    H, V = cfg.hidden, cfg.vocab
    embed = matrix(f.tensor(N.TOKEN_EMBD), (V, H))
    out_norm = vector(f.tensor(N.OUTPUT_NORM), H)
    # Required, as llama.cpp's step35 loader requires it (the embeddings in its place ran a file
    # that lost its head without a word, a review's finding); our converter writes a tied model's.
    output = matrix(f.tensor(N.OUTPUT), (V, H))
    factors = vector(f.tensors[N.ROPE_FREQS], cfg.head_dim // 2).astype(np.float64) if N.ROPE_FREQS in f.tensors else None
    blocks = [_block(f, cfg, i) for i in range(cfg.n_layers)]
    # A trunk-only file (llama.cpp can split the MTP heads off) declares MTP blocks it lacks.
    has_mtp = cfg.n_mtp > 0 and N.blk(cfg.n_layers, N.NEXTN_EH_PROJ) in f.tensors
    nextn = []
    if has_mtp:
        for i in range(cfg.n_layers, cfg.n_blocks):
            blocks.append(_block(f, cfg, i))
            nextn.append(_nextn(f, cfg, i, out_norm, output))
    return ModelWeights(embed, out_norm, output, factors, blocks, nextn)
