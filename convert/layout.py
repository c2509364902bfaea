"""Every tensor of a Step-3.5 checkpoint: its Hugging Face name, GGUF name, shape and role.

This table is the one place that knows both naming schemes. The converter walks it, the
miniature generator writes it, and the tests' reference model reads it.

Shape legend (HF / numpy order; GGUF's ne[] is the reverse):
    H  hidden size          V  vocab size          D  head dim
    Nh query heads (layer)  Nk KV groups (layer)   F  dense FFN width
    E  routed experts       I  expert FFN width    S  shared-expert width
"""

from __future__ import annotations

from dataclasses import dataclass

from runtime.base import gguf_schema as G

from convert.hf_config import HFConfig

# Roles decide conversion: norms get +1 (the model multiplies by 1 + w) and stay f32;
# the quantization policy picks a format per role.
NORM = "norm"
ATTN = "attn"  # q, k, v, o projections
ATTN_GATE = "attn_gate"  # head-wise gate g_proj [Nh, H]
DENSE = "dense"  # dense MLP of the leading layers and the MTP blocks
ROUTER = "router"  # [E, H]
ROUTER_BIAS = "router_bias"  # [E], selection only
EXPERTS = "experts"  # fused [E, I, H] / [E, H, I]
SHARED = "shared"  # shared expert
EMBED = "embed"
OUTPUT = "output"  # LM heads (trunk and MTP)
MTP_PROJ = "mtp_proj"  # eh_proj [H, 2H]


@dataclass(frozen=True)
class TensorSpec:
    hf_name: str
    gguf_name: str
    shape: tuple[int, ...]
    role: str
    block: int | None = None

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def _block(cfg: HFConfig, i: int) -> list[TensorSpec]:
    H, D = cfg.hidden_size, cfg.head_dim
    nh, nk = cfg.n_head[i], cfg.n_head_kv[i]
    hf = f"model.layers.{i}."

    def blk(name: str) -> str:
        return G.blk(i, name)

    specs = [
        TensorSpec(hf + "input_layernorm.weight", blk(G.ATTN_NORM), (H,), NORM, i),
        TensorSpec(hf + "self_attn.q_proj.weight", blk(G.ATTN_Q), (nh * D, H), ATTN, i),
        TensorSpec(hf + "self_attn.k_proj.weight", blk(G.ATTN_K), (nk * D, H), ATTN, i),
        TensorSpec(hf + "self_attn.v_proj.weight", blk(G.ATTN_V), (nk * D, H), ATTN, i),
        TensorSpec(hf + "self_attn.o_proj.weight", blk(G.ATTN_OUTPUT), (H, nh * D), ATTN, i),
        TensorSpec(hf + "self_attn.q_norm.weight", blk(G.ATTN_Q_NORM), (D,), NORM, i),
        TensorSpec(hf + "self_attn.k_norm.weight", blk(G.ATTN_K_NORM), (D,), NORM, i),
        TensorSpec(hf + "self_attn.g_proj.weight", blk(G.ATTN_GATE), (nh, H), ATTN_GATE, i),
        TensorSpec(hf + "post_attention_layernorm.weight", blk(G.FFN_NORM), (H,), NORM, i),
    ]
    if cfg.is_moe(i):
        E, I, S = cfg.n_expert, cfg.expert_ffn, cfg.shared_ffn
        specs += [
            TensorSpec(hf + "moe.gate.weight", blk(G.ROUTER), (E, H), ROUTER, i),
            TensorSpec(hf + "moe.gate_proj.weight", blk(G.EXPERTS[0]), (E, I, H), EXPERTS, i),
            TensorSpec(hf + "moe.up_proj.weight", blk(G.EXPERTS[1]), (E, I, H), EXPERTS, i),
            TensorSpec(hf + "moe.down_proj.weight", blk(G.EXPERTS[2]), (E, H, I), EXPERTS, i),
            TensorSpec(hf + "share_expert.gate_proj.weight", blk(G.SHARED[0]), (S, H), SHARED, i),
            TensorSpec(hf + "share_expert.up_proj.weight", blk(G.SHARED[1]), (S, H), SHARED, i),
            TensorSpec(hf + "share_expert.down_proj.weight", blk(G.SHARED[2]), (H, S), SHARED, i),
        ]
        if cfg.use_router_bias:
            specs.append(TensorSpec(hf + "moe.router_bias", blk(G.ROUTER_BIAS), (E,), ROUTER_BIAS, i))
    else:
        F = cfg.intermediate_size
        specs += [
            TensorSpec(hf + "mlp.gate_proj.weight", blk(G.DENSE[0]), (F, H), DENSE, i),
            TensorSpec(hf + "mlp.up_proj.weight", blk(G.DENSE[1]), (F, H), DENSE, i),
            TensorSpec(hf + "mlp.down_proj.weight", blk(G.DENSE[2]), (H, F), DENSE, i),
        ]
    if i >= cfg.n_layers:  # MTP block: NextN wiring and its own head
        V = cfg.vocab_size
        specs += [
            TensorSpec(hf + "enorm.weight", blk(G.NEXTN_ENORM), (H,), NORM, i),
            TensorSpec(hf + "hnorm.weight", blk(G.NEXTN_HNORM), (H,), NORM, i),
            TensorSpec(hf + "eh_proj.weight", blk(G.NEXTN_EH_PROJ), (H, 2 * H), MTP_PROJ, i),
            TensorSpec(hf + "transformer.shared_head.norm.weight", blk(G.NEXTN_HEAD_NORM), (H,), NORM, i),
            TensorSpec(hf + "transformer.shared_head.output.weight", blk(G.NEXTN_HEAD), (V, H), OUTPUT, i),
        ]
    return specs


def checkpoint_layout(cfg: HFConfig) -> list[TensorSpec]:
    """All tensors in GGUF write order: embeddings, blocks (trunk then MTP), final norm, head.
    With tied embeddings the head's checkpoint tensor is the embeddings' (named twice: a writer
    of checkpoints, which never ties, would write it twice)."""
    H, V = cfg.hidden_size, cfg.vocab_size
    specs = [TensorSpec("model.embed_tokens.weight", G.TOKEN_EMBD, (V, H), EMBED)]
    for i in range(cfg.n_blocks):
        specs += _block(cfg, i)
    specs.append(TensorSpec("model.norm.weight", G.OUTPUT_NORM, (H,), NORM))
    # tied embeddings (tie_word_embeddings): the output head is the embedding matrix, written as
    # output.weight too, since llama.cpp's step35 loader requires that tensor
    head = "model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"
    specs.append(TensorSpec(head, G.OUTPUT, (V, H), OUTPUT))
    return specs


# Checkpoint tensors that carry no weights the model needs, with the reason they are skipped.
SKIPPABLE_SUFFIXES = {
    ".rotary_emb.inv_freq": "recomputed from rope_theta at run time",
}


def skip_reason(cfg, name: str) -> str | None:
    """Why a checkpoint tensor outside the layout is left out, as transformers leaves it out
    when it loads the model (None: it is an error). Besides SKIPPABLE_SUFFIXES: blocks past
    the trunk and the MTP blocks config.json declares (MTP weights in a checkpoint whose
    num_nextn_predict_layers is 0 or absent), and a tied checkpoint's lm_head.weight."""
    reason = next((why for suffix, why in SKIPPABLE_SUFFIXES.items() if name.endswith(suffix)), None)
    if reason is not None:
        return reason
    parts = name.split(".")
    if parts[:2] == ["model", "layers"] and len(parts) > 2 and parts[2].isdigit() and int(parts[2]) >= cfg.n_blocks:
        return (f"block {parts[2]} is past the {cfg.n_layers} layers and {cfg.n_mtp} MTP blocks config.json "
                "declares (num_hidden_layers, num_nextn_predict_layers): not converted")
    if name == "lm_head.weight" and cfg.tie_word_embeddings:
        return "tie_word_embeddings: the output head is model.embed_tokens.weight"
    return None
