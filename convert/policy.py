"""Which GGUF format each tensor gets, for each `--type`.

Norms, the router and its bias stay F32 in every type, as in llama.cpp, because routing
decisions are sensitive to them.

Our own mixes
    `q4_k_m` (the default): routed experts (the bulk of the model, and what streams from
    disk) at Q4_K; attention, the head-wise gate, shared experts, dense MLPs, MTP
    projections, embeddings and LM heads at Q6_K (6.56 bits). `q4_k`, `q4_0`, `q8_0` and
    the float types are uniform. A matrix whose row length is not a multiple of the
    format's block falls back to Q8_0, then F16.

llama.cpp's presets (`q2_k`, `q3_k_s`, `q3_k_m`, `q3_k_l`, `q4_k_s`, `q5_k_m`, `q6_k`)
    follow `llama_tensor_get_type` of the llama.cpp that llama-cpp-python bundles, so a file
    made here has the tensor mix of `llama-quantize` run on our f16 file (the tests compare
    the two). Every matrix gets the preset's base type (Q2_K, Q3_K, Q3_K, Q3_K, Q4_K, Q5_K, Q6_K)
    except:
      - output.weight (the trunk's LM head): Q6_K. The MTP heads are not "output" to
        llama.cpp and get the base type, as does token_embd (the model has its own head).
      - attn_v: q2_k Q4_K when block 0 has >= 4 query heads per KV head, else Q3_K;
        q3_k_m Q5_K in the first two blocks, Q4_K after; q3_k_l Q5_K; q4_k_s Q5_K in the
        first four blocks; q5_k_m Q6_K in the blocks where `more_bits` holds.
      - ffn_down (dense, shared and routed alike): q2_k Q3_K; q3_k_m Q5_K in blocks below
        n/16, Q4_K after; q3_k_l Q5_K; q4_k_s Q5_K in blocks below n/8; q5_k_m Q6_K where
        `more_bits` holds. (q4_k_s is the format of the official Step-3.5-Flash GGUF.)
      - attn_output: q2_k Q3_K, q3_k_m Q4_K, q3_k_l Q5_K.
      - 8-expert models only (Mixtral's rule; not Step-3.5's 288): attn_v and attn_k Q8_0,
        and attn_output Q5_K for q2_k, q3_k_s and q3_k_m.
    Block indices count every GGUF block, the MTP blocks too (llama.cpp's n_layer is the
    block count), and `more_bits(i, n)` is i < n/8 or i >= 7n/8 or (i - n/8) % 3 == 2.
    A matrix whose rows are not a multiple of 256 falls back as llama.cpp does: Q2_K and
    Q3_K to Q4_0, Q4_K to Q5_0, Q5_K to Q5_1, Q6_K to Q8_0, and to F16 when even that does
    not fit; the LM head goes to Q8_0.
"""

from __future__ import annotations

from dataclasses import dataclass

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q, LlamaFileType

from convert import layout
from convert.hf_config import HFConfig
from runtime.base import gguf_schema as G

LLAMA_MIXES = ("q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s", "q5_k_m", "q6_k")
TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_k", "q4_k_m", *LLAMA_MIXES)
DEFAULT_TYPE = "q4_k_m"

_UNIFORM = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0, "q4_k": Q.Q4_K}
_BASE = {"q2_k": Q.Q2_K, "q3_k_s": Q.Q3_K, "q3_k_m": Q.Q3_K, "q3_k_l": Q.Q3_K, "q4_k_s": Q.Q4_K, "q5_k_m": Q.Q5_K,
         "q6_k": Q.Q6_K}
FILE_TYPE = {
    "f32": LlamaFileType.ALL_F32,
    "f16": LlamaFileType.MOSTLY_F16,
    "bf16": LlamaFileType.MOSTLY_BF16,
    "q8_0": LlamaFileType.MOSTLY_Q8_0,
    "q4_0": LlamaFileType.MOSTLY_Q4_0,
    "q4_k": LlamaFileType.MOSTLY_Q4_K_S,
    "q4_k_m": LlamaFileType.MOSTLY_Q4_K_M,
    "q2_k": LlamaFileType.MOSTLY_Q2_K,
    "q3_k_s": LlamaFileType.MOSTLY_Q3_K_S,
    "q3_k_m": LlamaFileType.MOSTLY_Q3_K_M,
    "q3_k_l": LlamaFileType.MOSTLY_Q3_K_L,
    "q4_k_s": LlamaFileType.MOSTLY_Q4_K_S,
    "q5_k_m": LlamaFileType.MOSTLY_Q5_K_M,
    "q6_k": LlamaFileType.MOSTLY_Q6_K,
}
_ALWAYS_F32 = {layout.NORM, layout.ROUTER, layout.ROUTER_BIAS}
_FALLBACK = [Q.Q8_0, Q.F16]
_LLAMA_FALLBACK = {Q.Q2_K: Q.Q4_0, Q.Q3_K: Q.Q4_0, Q.Q4_K: Q.Q5_0, Q.Q5_K: Q.Q5_1, Q.Q6_K: Q.Q8_0}


@dataclass(frozen=True)
class ModelFacts:
    """What llama.cpp's preset rules read from the model besides a tensor's name."""
    n_blocks: int  # GGUF blocks, MTP blocks included (llama.cpp's n_layer)
    n_gqa: int  # query heads per KV head in block 0 (llama.cpp's n_gqa())
    n_expert: int

    @classmethod
    def of(cls, cfg: HFConfig) -> ModelFacts:
        return cls(cfg.n_blocks, cfg.n_head[0] // max(cfg.n_head_kv[0], 1), cfg.n_expert)


def more_bits(i: int, n: int) -> bool:
    """llama.cpp's use_more_bits: the first and last eighth of the blocks and every third between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _kind(name: str) -> str:
    """llama.cpp's tensor category, from the GGUF name (it matches names, not roles)."""
    if name == G.OUTPUT:
        return "output"
    for kind in ("attn_v", "attn_k", "attn_q", "attn_output"):
        if f".{kind}.weight" in name:
            return kind
    return "ffn_down" if "ffn_down" in name else "other"


def _llama_mix(spec: layout.TensorSpec, ftype: str, model: ModelFacts) -> Q:
    base = _BASE[ftype]
    kind = _kind(spec.gguf_name)
    i, n = spec.block if spec.block is not None else 0, model.n_blocks
    eight = model.n_expert == 8
    if kind == "output":
        return Q.Q6_K
    if kind == "attn_v":
        if eight:
            return Q.Q8_0
        if ftype == "q2_k":
            return Q.Q4_K if model.n_gqa >= 4 else Q.Q3_K
        if ftype == "q3_k_m":
            return Q.Q5_K if i < 2 else Q.Q4_K
        if ftype == "q3_k_l":
            return Q.Q5_K
        if ftype == "q5_k_m" and more_bits(i, n):
            return Q.Q6_K
        if ftype == "q4_k_s" and i < 4:
            return Q.Q5_K
    if kind == "attn_k" and eight:
        return Q.Q8_0
    if kind == "ffn_down":
        if ftype == "q2_k":
            return Q.Q3_K
        if ftype == "q3_k_m":
            return Q.Q5_K if i < n // 16 else Q.Q4_K
        if ftype == "q3_k_l":
            return Q.Q5_K
        if ftype == "q5_k_m" and more_bits(i, n):
            return Q.Q6_K
        if ftype == "q4_k_s" and i < n // 8:
            return Q.Q5_K
    if kind == "attn_output":
        if eight:
            return Q.Q5_K if ftype in ("q2_k", "q3_k_s", "q3_k_m") else base
        return {"q2_k": Q.Q3_K, "q3_k_m": Q.Q4_K, "q3_k_l": Q.Q5_K}.get(ftype, base)
    return base


def wanted(spec: layout.TensorSpec, ftype: str, model: ModelFacts | None = None) -> Q:
    """The format `spec` should have in a `ftype` file, before any row-length fallback.
    llama.cpp's presets need `model` (ModelFacts.of(cfg))."""
    if spec.role in _ALWAYS_F32:
        return Q.F32
    if ftype in _BASE:
        if model is None:
            raise ValueError(f"--type {ftype} follows llama.cpp's preset rules, which need the model's ModelFacts")
        return _llama_mix(spec, ftype, model)
    if ftype == "q4_k_m":
        return Q.Q4_K if spec.role == layout.EXPERTS else Q.Q6_K
    return _UNIFORM[ftype]


def _fits(q: Q, cols: int) -> bool:
    return cols % GGML_QUANT_SIZES[q][0] == 0


def choose(spec: layout.TensorSpec, ftype: str, model: ModelFacts | None = None) -> Q:
    """The format `spec` is written in: the wanted one, or a fallback that fits its rows."""
    q = wanted(spec, ftype, model)
    cols = spec.shape[-1]
    if _fits(q, cols):
        return q
    if ftype in _BASE:
        if _kind(spec.gguf_name) == "output":
            q = Q.Q8_0
        else:
            q = _LLAMA_FALLBACK.get(q, Q.F16)
        return q if _fits(q, cols) else Q.F16
    for f in _FALLBACK:
        if _fits(f, cols) and GGML_QUANT_SIZES[f][0] > 1:
            return f
    return Q.F16 if q != Q.F32 else Q.F32
