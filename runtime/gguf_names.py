"""Every GGUF metadata key and tensor name the runtime reads, in one place.

Keys are gguf-py's `Keys` constants (the names llama.cpp reads), formatted for the
`step35` architecture. Tensor names are llama.cpp's `blk.{i}.*` templates.
"""

from __future__ import annotations

from gguf import Keys

ARCH = "step35"


def _a(template: str) -> str:
    return template.format(arch=ARCH)


class Key:
    ARCHITECTURE = Keys.General.ARCHITECTURE
    ALIGNMENT = Keys.General.ALIGNMENT
    SPLIT_COUNT = Keys.Split.LLM_KV_SPLIT_COUNT
    SPLIT_NO = Keys.Split.LLM_KV_SPLIT_NO
    SPLIT_TENSORS = Keys.Split.LLM_KV_SPLIT_TENSORS_COUNT

    BLOCK_COUNT = _a(Keys.LLM.BLOCK_COUNT)
    NEXTN = _a(Keys.LLM.NEXTN_PREDICT_LAYERS)
    CONTEXT_LENGTH = _a(Keys.LLM.CONTEXT_LENGTH)
    EMBEDDING_LENGTH = _a(Keys.LLM.EMBEDDING_LENGTH)
    FFN_LENGTH = _a(Keys.LLM.FEED_FORWARD_LENGTH)
    HEAD_COUNT = _a(Keys.Attention.HEAD_COUNT)
    HEAD_COUNT_KV = _a(Keys.Attention.HEAD_COUNT_KV)
    KEY_LENGTH = _a(Keys.Attention.KEY_LENGTH)
    VALUE_LENGTH = _a(Keys.Attention.VALUE_LENGTH)
    RMS_EPS = _a(Keys.Attention.LAYERNORM_RMS_EPS)
    SLIDING_WINDOW = _a(Keys.Attention.SLIDING_WINDOW)
    SLIDING_PATTERN = _a(Keys.Attention.SLIDING_WINDOW_PATTERN)
    ROPE_BASE = _a(Keys.Rope.FREQ_BASE)
    ROPE_BASE_SWA = _a(Keys.Rope.FREQ_BASE_SWA)
    ROPE_DIMS = _a(Keys.Rope.DIMENSION_COUNT)
    EXPERT_COUNT = _a(Keys.LLM.EXPERT_COUNT)
    EXPERT_USED = _a(Keys.LLM.EXPERT_USED_COUNT)
    EXPERT_FFN = _a(Keys.LLM.EXPERT_FEED_FORWARD_LENGTH)
    SHARED_FFN = _a(Keys.LLM.EXPERT_SHARED_FEED_FORWARD_LENGTH)
    EXPERT_SCALE = _a(Keys.LLM.EXPERT_WEIGHTS_SCALE)
    EXPERT_NORM = _a(Keys.LLM.EXPERT_WEIGHTS_NORM)
    EXPERT_GATING = _a(Keys.LLM.EXPERT_GATING_FUNC)
    LEADING_DENSE = _a(Keys.LLM.LEADING_DENSE_BLOCK_COUNT)
    CLAMP_EXP = _a(Keys.LLM.SWIGLU_CLAMP_EXP)
    CLAMP_SHEXP = _a(Keys.LLM.SWIGLU_CLAMP_SHEXP)

    TOK_MODEL = Keys.Tokenizer.MODEL
    TOK_PRE = Keys.Tokenizer.PRE
    TOK_LIST = Keys.Tokenizer.LIST
    TOK_TYPES = Keys.Tokenizer.TOKEN_TYPE
    TOK_MERGES = Keys.Tokenizer.MERGES
    TOK_BOS = Keys.Tokenizer.BOS_ID
    TOK_EOS = Keys.Tokenizer.EOS_ID
    TOK_EOT = Keys.Tokenizer.EOT_ID
    TOK_PAD = Keys.Tokenizer.PAD_ID
    TOK_ADD_BOS = Keys.Tokenizer.ADD_BOS
    TOK_ADD_EOS = Keys.Tokenizer.ADD_EOS
    CHAT_TEMPLATE = Keys.Tokenizer.CHAT_TEMPLATE
    HF_JSON = "stepstream.tokenizer.hf_json"  # written by our converter only


# Top-level tensors.
TOKEN_EMBD = "token_embd.weight"
OUTPUT_NORM = "output_norm.weight"
OUTPUT = "output.weight"
ROPE_FREQS = "rope_freqs.weight"  # llama3 rope scaling factors, full-attention layers


def blk(i: int, name: str) -> str:
    return f"blk.{i}.{name}"


# Per-block tensor suffixes, grouped by what reads them.
ATTN = ("attn_norm.weight", "attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_output.weight",
        "attn_q_norm.weight", "attn_k_norm.weight", "attn_gate.weight", "ffn_norm.weight")
DENSE = ("ffn_gate.weight", "ffn_up.weight", "ffn_down.weight")
ROUTER = "ffn_gate_inp.weight"
ROUTER_BIAS = "exp_probs_b.bias"
EXPERTS = ("ffn_gate_exps.weight", "ffn_up_exps.weight", "ffn_down_exps.weight")
SHARED = ("ffn_gate_shexp.weight", "ffn_up_shexp.weight", "ffn_down_shexp.weight")
NEXTN = ("nextn.eh_proj.weight", "nextn.enorm.weight", "nextn.hnorm.weight")
NEXTN_HEAD = ("nextn.shared_head_norm.weight", "nextn.shared_head_head.weight")  # optional: fall back to the trunk's
