"""The Hugging Face `config.json` of a Step-3.5 checkpoint, parsed and validated once.

Layer indices run over trunk layers 0..n_layers-1 and then the MTP blocks
n_layers..n_layers+n_mtp-1 (the checkpoint stores them as `model.layers.{n_layers+j}`).
Per-layer lists in the config (`layer_types`, `partial_rotary_factors`, `rope_theta`,
`swiglu_limits*`) may or may not cover the MTP blocks: missing entries follow
llama.cpp's converter (full attention, rotary 0.5, no clamp).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from runtime.base.errors import StepstreamError

ARCHITECTURE = "Step3p5ForCausalLM"
MODEL_TYPE = "step3p5"


@dataclass(frozen=True)
class HFConfig:
    # sizes
    hidden_size: int
    n_layers: int  # trunk layers (num_hidden_layers)
    n_mtp: int  # MTP blocks appended after the trunk (num_nextn_predict_layers)
    vocab_size: int
    head_dim: int
    # attention, per block (trunk + MTP)
    sliding: tuple[bool, ...]
    n_head: tuple[int, ...]
    n_head_kv: tuple[int, ...]
    rotary_factor: tuple[float, ...]
    sliding_window: int
    rope_theta_full: float
    rope_theta_sliding: float
    rope_scaling: dict | None  # llama3-style, full-attention layers only
    # feed-forward
    intermediate_size: int  # dense layers and MTP blocks
    moe_layers: frozenset[int]
    n_expert: int
    n_expert_used: int
    expert_ffn: int
    shared_ffn: int
    router_scale: float
    norm_expert_weight: bool
    use_router_bias: bool
    swiglu_limit: tuple[float, ...]  # routed experts, per block
    swiglu_limit_shared: tuple[float, ...]  # shared expert and dense MLPs, per block
    # misc
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    raw: dict

    @property
    def n_blocks(self) -> int:
        return self.n_layers + self.n_mtp

    @property
    def n_leading_dense(self) -> int:
        return min(self.moe_layers) if self.moe_layers else self.n_layers

    def is_moe(self, i: int) -> bool:
        return i in self.moe_layers

    @classmethod
    def load(cls, directory: str | Path) -> "HFConfig":
        path = Path(directory) / "config.json"
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise StepstreamError(f"{path}: not found; a Hugging Face checkpoint directory needs config.json") from None
        except json.JSONDecodeError as e:
            raise StepstreamError(f"{path}: invalid JSON ({e})") from None
        return cls.from_dict(raw, source=str(path))

    @classmethod
    def from_dict(cls, raw: dict, source: str = "config.json") -> "HFConfig":
        archs = raw.get("architectures") or []
        if ARCHITECTURE not in archs and raw.get("model_type") != MODEL_TYPE:
            raise StepstreamError(
                f"{source}: not a Step-3.5 config (architectures={archs}, model_type={raw.get('model_type')!r}); "
                f"expected {ARCHITECTURE!r} / {MODEL_TYPE!r}"
            )
        r = _Fields(raw, source)
        sliding, rotary = _layer_types(r)
        n_head, n_head_kv = _heads(r, sliding)
        theta_full, theta_swa = _rope_theta(r, sliding)
        cfg = cls(
            hidden_size=int(r.need("hidden_size")),
            n_layers=r.n_layers,
            n_mtp=r.n_mtp,
            vocab_size=int(r.need("vocab_size")),
            head_dim=int(r.need("head_dim")),
            sliding=sliding,
            n_head=n_head,
            n_head_kv=n_head_kv,
            rotary_factor=rotary,
            sliding_window=int(r.need("sliding_window")),
            rope_theta_full=theta_full,
            rope_theta_sliding=theta_swa,
            rope_scaling=_rope_scaling(r),
            intermediate_size=int(r.need("intermediate_size")),
            moe_layers=_moe_layers(r),
            n_expert=int(r.need("moe_num_experts")),
            n_expert_used=int(r.need("moe_top_k")),
            expert_ffn=int(r.need("moe_intermediate_size")),
            shared_ffn=int(raw.get("share_expert_dim", r.need("moe_intermediate_size"))),
            router_scale=float(raw.get("moe_router_scaling_factor", 1.0)),
            norm_expert_weight=bool(raw.get("norm_expert_weight", True)),
            use_router_bias=bool(raw.get("use_moe_router_bias", True)),
            swiglu_limit=r.per_block("swiglu_limits", 0.0),
            swiglu_limit_shared=r.per_block("swiglu_limits_shared", 0.0),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-5)),
            max_position_embeddings=int(raw.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            raw=raw,
        )
        if not 0 < cfg.n_expert_used <= cfg.n_expert:
            raise StepstreamError(f"{source}: moe_top_k={cfg.n_expert_used} must be in 1..moe_num_experts={cfg.n_expert}")
        return cfg


class _Fields:
    """config.json's values, read with errors that name the file and the key."""

    def __init__(self, raw: dict, source: str):
        self.raw, self.source = raw, source
        self.n_layers = int(self.need("num_hidden_layers"))
        self.n_mtp = int(raw.get("num_nextn_predict_layers", 0) or 0)
        self.n_blocks = self.n_layers + self.n_mtp

    def need(self, key: str):
        if key not in self.raw:
            raise StepstreamError(f"{self.source}: missing required key {key!r}")
        return self.raw[key]

    def per_block(self, key: str, default, convert=float) -> tuple:
        """One value per block (trunk and MTP): a list (MTP blocks may be left out), or one value for all."""
        values = self.raw.get(key)
        if values is None:
            return tuple([default] * self.n_blocks)
        if not isinstance(values, list):
            return tuple([convert(values)] * self.n_blocks)
        if len(values) < self.n_layers:
            raise StepstreamError(f"{self.source}: {key} has {len(values)} entries, fewer than "
                                  f"num_hidden_layers={self.n_layers}")
        values = [default if v is None else convert(v) for v in values[:self.n_blocks]]
        return tuple(values + [default] * (self.n_blocks - len(values)))


def _layer_types(r: _Fields) -> tuple[tuple[bool, ...], tuple[float, ...]]:
    """(sliding per block, rotary factor per block), checked against each other."""
    layer_types = r.per_block("layer_types", "full_attention", str)
    bad = sorted({t for t in layer_types} - {"full_attention", "sliding_attention"})
    if bad:
        raise StepstreamError(f"{r.source}: layer_types holds unknown types {bad}")
    sliding = tuple(t == "sliding_attention" for t in layer_types)
    rotary = r.per_block("partial_rotary_factors", 0.5)
    for i, (s, f) in enumerate(zip(sliding, rotary)):
        if f != (1.0 if s else 0.5):
            raise StepstreamError(f"{r.source}: partial_rotary_factors[{i}]={f} but layer {i} is {layer_types[i]}; "
                                  "Step-3.5 rotates all dims on sliding layers and half on full ones")
    return sliding, rotary


def _heads(r: _Fields, sliding) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Query heads and KV groups per block (sliding blocks may have their own counts)."""
    other = r.raw.get("attention_other_setting") or {}
    n_head_full = int(r.need("num_attention_heads"))
    n_kv_full = int(r.need("num_attention_groups"))
    n_head_swa = int(other.get("num_attention_heads", n_head_full))
    n_kv_swa = int(other.get("num_attention_groups", n_kv_full))
    n_head = tuple(n_head_swa if s else n_head_full for s in sliding)
    n_head_kv = tuple(n_kv_swa if s else n_kv_full for s in sliding)
    for i, (h, kv) in enumerate(zip(n_head, n_head_kv)):
        if kv <= 0 or h % kv:
            raise StepstreamError(f"{r.source}: layer {i} has {h} query heads, not a multiple of its {kv} KV groups")
    return n_head, n_head_kv


def _rope_theta(r: _Fields, sliding) -> tuple[float, float]:
    """RoPE bases of full and sliding blocks: one value, or a per-layer list with one base per type."""
    theta = r.raw.get("rope_theta", 10000.0)
    if not isinstance(theta, list):
        return float(theta), float(theta)
    full = [float(t) for t, s in zip(theta, sliding) if not s]
    swa = [float(t) for t, s in zip(theta, sliding) if s]
    theta_full = full[0] if full else float(theta[0])
    if len(set(full)) > 1 or len(set(swa)) > 1:
        raise StepstreamError(f"{r.source}: rope_theta varies within one attention type ({sorted(set(full))} / "
                              f"{sorted(set(swa))}); GGUF stores one base per type")
    return theta_full, swa[0] if swa else theta_full


def _moe_layers(r: _Fields) -> frozenset[int]:
    moe_enum = r.raw.get("moe_layers_enum")
    if isinstance(moe_enum, str) and moe_enum.strip():
        moe_layers = frozenset(int(v) for v in moe_enum.split(","))
    elif isinstance(moe_enum, list):
        moe_layers = frozenset(int(v) for v in moe_enum)
    else:
        moe_layers = frozenset(range(1, r.n_layers))
    if any(not 0 <= i < r.n_layers for i in moe_layers):
        raise StepstreamError(f"{r.source}: moe_layers_enum names layers outside 0..{r.n_layers - 1}")
    return moe_layers


def _rope_scaling(r: _Fields) -> dict | None:
    scaling = r.raw.get("rope_scaling")
    if scaling is not None:
        kind = str(scaling.get("rope_type", scaling.get("type", ""))).lower()
        if kind != "llama3":
            raise StepstreamError(f"{r.source}: rope_scaling type {kind!r} is not supported (only llama3)")
    return scaling
