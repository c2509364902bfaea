"""Every GGUF metadata key and tensor name of a step35 file, in one place.

The converter writes them, the loader and offload read them. Keys are gguf-py's `Keys`
constants (the names llama.cpp reads), formatted for the `step35` architecture; tensor
names are llama.cpp's `blk.{i}.*` templates.
"""

from __future__ import annotations

from gguf import Keys

ARCH = "step35"


def _a(template: str) -> str:
    return template.format(arch=ARCH)


class Key:
    ARCHITECTURE = Keys.General.ARCHITECTURE
    NAME = Keys.General.NAME
    FILE_TYPE = Keys.General.FILE_TYPE
    QUANTIZATION_VERSION = Keys.General.QUANTIZATION_VERSION
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
    ROPE_SCALING_TYPE = _a(Keys.Rope.SCALING_TYPE)
    ROPE_SCALING_FACTOR = _a(Keys.Rope.SCALING_FACTOR)
    ROPE_SCALE_LINEAR = _a("{arch}.rope.scale_linear")  # the older spelling llama.cpp still reads
    EXPERT_COUNT = _a(Keys.LLM.EXPERT_COUNT)
    EXPERT_USED = _a(Keys.LLM.EXPERT_USED_COUNT)
    EXPERT_FFN = _a(Keys.LLM.EXPERT_FEED_FORWARD_LENGTH)
    SHARED_FFN = _a(Keys.LLM.EXPERT_SHARED_FEED_FORWARD_LENGTH)
    EXPERT_SCALE = _a(Keys.LLM.EXPERT_WEIGHTS_SCALE)
    EXPERT_NORM = _a(Keys.LLM.EXPERT_WEIGHTS_NORM)
    EXPERT_GATING = _a(Keys.LLM.EXPERT_GATING_FUNC)
    LEADING_DENSE = _a(Keys.LLM.LEADING_DENSE_BLOCK_COUNT)
    MOE_EVERY_N = _a(Keys.LLM.MOE_EVERY_N_LAYERS)
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
    TOK_EOM = Keys.Tokenizer.EOM_ID
    TOK_FIM_PAD = Keys.Tokenizer.FIM_PAD_ID
    TOK_FIM_REP = Keys.Tokenizer.FIM_REP_ID
    TOK_FIM_SEP = Keys.Tokenizer.FIM_SEP_ID
    TOK_PAD = Keys.Tokenizer.PAD_ID
    TOK_ADD_BOS = Keys.Tokenizer.ADD_BOS
    TOK_ADD_EOS = Keys.Tokenizer.ADD_EOS
    CHAT_TEMPLATE = Keys.Tokenizer.CHAT_TEMPLATE
    HF_JSON = "stepstream.tokenizer.hf_json"  # the checkpoint's tokenizer.json, written by our converter only
    # tokenizer.ggml.pre as our converter wrote it beside HF_JSON: a file whose pre was edited since
    # (gguf-py's gguf_set_metadata.py, gguf_new_metadata.py) tokenizes by the edited name, as llama.cpp does
    HF_JSON_PRE = "stepstream.tokenizer.hf_json_pre"


GATING_NONE = 0  # EXPERT_GATING values: llama.cpp's LLAMA_EXPERT_GATING_FUNC_TYPE_NONE ...
GATING_SIGMOID = 2  # ... and _SIGMOID

# Top-level tensors.
TOKEN_EMBD = "token_embd.weight"
OUTPUT_NORM = "output_norm.weight"
OUTPUT = "output.weight"
ROPE_FREQS = "rope_freqs.weight"  # llama3 rope scaling factors, full-attention layers


def blk(i: int, name: str) -> str:
    """The name of block i's tensor `name` (one of the suffixes below)."""
    return f"blk.{i}.{name}"


# Per-block tensor suffixes.
ATTN_NORM = "attn_norm.weight"
ATTN_Q = "attn_q.weight"
ATTN_K = "attn_k.weight"
ATTN_V = "attn_v.weight"
ATTN_OUTPUT = "attn_output.weight"
ATTN_Q_NORM = "attn_q_norm.weight"
ATTN_K_NORM = "attn_k_norm.weight"
ATTN_GATE = "attn_gate.weight"  # head-wise output gate
FFN_NORM = "ffn_norm.weight"
DENSE = ("ffn_gate.weight", "ffn_up.weight", "ffn_down.weight")  # gate, up, down
ROUTER = "ffn_gate_inp.weight"
ROUTER_BIAS = "exp_probs_b.bias"
EXPERT_PARTS = ("gate", "up", "down")
EXPERTS = tuple(f"ffn_{p}_exps.weight" for p in EXPERT_PARTS)  # 3-D, one contiguous slice per expert
SHARED = ("ffn_gate_shexp.weight", "ffn_up_shexp.weight", "ffn_down_shexp.weight")
NEXTN_EH_PROJ = "nextn.eh_proj.weight"
NEXTN_ENORM = "nextn.enorm.weight"
NEXTN_HNORM = "nextn.hnorm.weight"
NEXTN_HEAD_NORM = "nextn.shared_head_norm.weight"  # optional: the trunk's output_norm otherwise
NEXTN_HEAD = "nextn.shared_head_head.weight"  # optional: the trunk's output otherwise


def expert_name(i: int, part: int, e: int) -> str:
    """How one expert's slice of block i's routed-expert tensor EXPERTS[part] is named in messages."""
    return f"blk.{i}.ffn_{EXPERT_PARTS[part]}_exps[{e}]"
