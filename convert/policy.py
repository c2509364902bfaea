"""Which GGUF format each tensor gets, for each `--type`.

`q4_k_m` is the mixed default: routed experts (the bulk of the model, and what streams
from disk) at Q4_K; attention, the head-wise gate, shared experts, dense MLPs, MTP
projections, embeddings and LM heads at Q6_K (6.56 bits). Norms, the router and its bias
stay F32 in every type, as in llama.cpp, because routing decisions are sensitive to them.
A matrix whose row length is not a multiple of the chosen format's block falls back to
the nearest format that fits (Q8_0, then F16), and the summary counts it.
"""

from __future__ import annotations

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q, LlamaFileType

from convert import layout

TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_k", "q4_k_m")
DEFAULT_TYPE = "q4_k_m"

_UNIFORM = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0, "q4_k": Q.Q4_K}
FILE_TYPE = {
    "f32": LlamaFileType.ALL_F32,
    "f16": LlamaFileType.MOSTLY_F16,
    "bf16": LlamaFileType.MOSTLY_BF16,
    "q8_0": LlamaFileType.MOSTLY_Q8_0,
    "q4_0": LlamaFileType.MOSTLY_Q4_0,
    "q4_k": LlamaFileType.MOSTLY_Q4_K_S,
    "q4_k_m": LlamaFileType.MOSTLY_Q4_K_M,
}
_ALWAYS_F32 = {layout.NORM, layout.ROUTER, layout.ROUTER_BIAS}
_FALLBACK = [Q.Q8_0, Q.F16]


def wanted(spec: layout.TensorSpec, ftype: str) -> Q:
    if spec.role in _ALWAYS_F32:
        return Q.F32
    if ftype == "q4_k_m":
        return Q.Q4_K if spec.role == layout.EXPERTS else Q.Q6_K
    return _UNIFORM[ftype]


def choose(spec: layout.TensorSpec, ftype: str) -> Q:
    """The format `spec` is written in: the wanted one, or a fallback that fits its rows."""
    q = wanted(spec, ftype)
    cols = spec.shape[-1]
    if cols % GGML_QUANT_SIZES[q][0] == 0:
        return q
    for f in _FALLBACK:
        if cols % GGML_QUANT_SIZES[f][0] == 0 and GGML_QUANT_SIZES[f][0] > 1:
            return f
    return Q.F16 if q != Q.F32 else Q.F32
