"""The shape of every tensor a step35 file may hold, as the model config implies it, and the
check that the file agrees: run when the config is built, before anything is allocated.

A head count, an expert count or an FFN width that disagrees with the tensors would
otherwise size a buffer wrongly or read past a tensor; here it is one line naming the
tensor, its shape, the shape expected and the metadata behind it.

Shape legend (numpy order):  V vocab  H hidden  D head dim  Nh/Nk heads of block i
    F dense FFN  E experts  I expert FFN  S shared FFN
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

from runtime.base import gguf_schema as N
from runtime.base.errors import StepstreamError
from runtime.base.gguf_file import GGUFModelFile
from runtime.base.gguf_schema import Key

if TYPE_CHECKING:
    from runtime.base.config import ModelConfig

Expected = dict[str, tuple[tuple[int, ...], str]]  # name -> (shape, the metadata that implies it)


def _attention(cfg: ModelConfig, i: int) -> Expected:
    H, D, nh, nk = cfg.hidden, cfg.head_dim, cfg.n_head[i], cfg.n_head_kv[i]
    heads = f"{Key.HEAD_COUNT}[{i}]={nh}, {Key.KEY_LENGTH}={D}, {Key.EMBEDDING_LENGTH}={H}"
    kv = f"{Key.HEAD_COUNT_KV}[{i}]={nk}, {Key.KEY_LENGTH}={D}, {Key.EMBEDDING_LENGTH}={H}"
    return {
        N.ATTN_NORM: ((H,), f"{Key.EMBEDDING_LENGTH}={H}"),
        N.ATTN_Q: ((nh * D, H), heads),
        N.ATTN_K: ((nk * D, H), kv),
        N.ATTN_V: ((nk * D, H), kv),
        N.ATTN_OUTPUT: ((H, nh * D), heads),
        N.ATTN_Q_NORM: ((D,), f"{Key.KEY_LENGTH}={D}"),
        N.ATTN_K_NORM: ((D,), f"{Key.KEY_LENGTH}={D}"),
        N.ATTN_GATE: ((nh, H), heads),
        N.FFN_NORM: ((H,), f"{Key.EMBEDDING_LENGTH}={H}"),
    }


def _ffn(cfg: ModelConfig, i: int) -> Expected:
    H, E, I, S, F = cfg.hidden, cfg.n_expert, cfg.expert_ffn, cfg.shared_ffn, cfg.dense_ffn
    if not cfg.moe[i]:
        why = f"{Key.FFN_LENGTH}={F}, {Key.EMBEDDING_LENGTH}={H}"
        return dict(zip(N.DENSE, [((F, H), why), ((F, H), why), ((H, F), why)]))
    experts = f"{Key.EXPERT_COUNT}={E}, {Key.EXPERT_FFN}={I}, {Key.EMBEDDING_LENGTH}={H}"
    shared = f"{Key.SHARED_FFN}={S}, {Key.EMBEDDING_LENGTH}={H}"
    return {
        N.ROUTER: ((E, H), f"{Key.EXPERT_COUNT}={E}, {Key.EMBEDDING_LENGTH}={H}"),
        N.ROUTER_BIAS: ((E,), f"{Key.EXPERT_COUNT}={E}"),
        **dict(zip(N.EXPERTS, [((E, I, H), experts), ((E, I, H), experts), ((E, H, I), experts)])),
        **dict(zip(N.SHARED, [((S, H), shared), ((S, H), shared), ((H, S), shared)])),
    }


def _nextn(cfg: ModelConfig) -> Expected:
    H, V = cfg.hidden, cfg.vocab
    return {
        N.NEXTN_EH_PROJ: ((H, 2 * H), f"{Key.EMBEDDING_LENGTH}={H}"),
        N.NEXTN_ENORM: ((H,), f"{Key.EMBEDDING_LENGTH}={H}"),
        N.NEXTN_HNORM: ((H,), f"{Key.EMBEDDING_LENGTH}={H}"),
        N.NEXTN_HEAD_NORM: ((H,), f"{Key.EMBEDDING_LENGTH}={H}"),
        N.NEXTN_HEAD: ((V, H), f"vocabulary {V}, {Key.EMBEDDING_LENGTH}={H}"),
    }


def expected_shapes(cfg: ModelConfig) -> Expected:
    """Every tensor name the config knows, with its shape and the metadata behind it."""
    H, V, D = cfg.hidden, cfg.vocab, cfg.head_dim
    out: Expected = {
        N.TOKEN_EMBD: ((V, H), f"vocabulary {V}, {Key.EMBEDDING_LENGTH}={H}"),
        N.OUTPUT_NORM: ((H,), f"{Key.EMBEDDING_LENGTH}={H}"),
        N.OUTPUT: ((V, H), f"vocabulary {V}, {Key.EMBEDDING_LENGTH}={H}"),
        N.ROPE_FREQS: ((D // 2,), f"{Key.KEY_LENGTH}={D}"),
    }
    for i in range(cfg.n_blocks):
        block = {**_attention(cfg, i), **_ffn(cfg, i), **(_nextn(cfg) if i >= cfg.n_layers else {})}
        out.update({N.blk(i, name): v for name, v in block.items()})
    return out


def check_block_kinds(f: GGUFModelFile, cfg: ModelConfig) -> None:
    """Each block the model runs (the trunk's, and the MTP blocks when the file has their tensors)
    is MoE exactly when it has a router. A disagreement is the error, said first: a review saw
    "N tensors this stepstream does not use" warned before it, pointing at the wrong cause."""
    has_mtp = cfg.n_mtp > 0 and N.blk(cfg.n_layers, N.NEXTN_EH_PROJ) in f.tensors
    for i in range(cfg.n_blocks if has_mtp else cfg.n_layers):
        has_router = N.blk(i, N.ROUTER) in f.tensors
        if has_router != cfg.moe[i]:
            kind = "MoE" if cfg.moe[i] else "dense"
            raise StepstreamError(f"{f.path}: block {i} is {kind} by {Key.LEADING_DENSE}, but its tensors say "
                                  f"otherwise ({N.blk(i, N.ROUTER)} {'present' if has_router else 'absent'})")


def check_tensor_shapes(f: GGUFModelFile, cfg: ModelConfig) -> None:
    """Every tensor of the file that the config has a shape for must have that shape; tensors
    it has none for are named in a warning (llama.cpp refuses such a file: a newer format's
    biases or norms left out would change the outputs without a word)."""
    check_block_kinds(f, cfg)  # before the unused tensors' warning, which a disagreement would explain away
    expected = expected_shapes(cfg)
    for name, (shape, why) in expected.items():
        t = f.tensors.get(name)
        if t is not None and tuple(t.shape) != shape:
            raise StepstreamError(f"{t.path}: tensor {name!r} has shape {list(t.shape)}, the metadata ({why}) "
                                  f"implies {list(shape)}")
    unused = [name for name in f.tensors if name not in expected]
    if unused:
        shown = ", ".join(unused[:4]) + (f" and {len(unused) - 4} more" if len(unused) > 4 else "")
        warnings.warn(f"{f.path}: {len(unused)} tensor{'s' if len(unused) > 1 else ''} this stepstream does not use "
                      f"({shown}); a newer or edited file, whose outputs may differ from llama.cpp's", stacklevel=2)
