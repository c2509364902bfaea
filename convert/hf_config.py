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

        def need(key: str):
            if key not in raw:
                raise StepstreamError(f"{source}: missing required key {key!r}")
            return raw[key]

        n_layers = int(need("num_hidden_layers"))
        n_mtp = int(raw.get("num_nextn_predict_layers", 0) or 0)
        n_blocks = n_layers + n_mtp

        def per_block(key: str, default, convert=float) -> tuple:
            values = raw.get(key)
            if values is None:
                return tuple([default] * n_blocks)
            if not isinstance(values, list):
                return tuple([convert(values)] * n_blocks)
            if len(values) < n_layers:
                raise StepstreamError(f"{source}: {key} has {len(values)} entries, fewer than num_hidden_layers={n_layers}")
            values = [default if v is None else convert(v) for v in values[:n_blocks]]
            return tuple(values + [default] * (n_blocks - len(values)))

        layer_types = per_block("layer_types", "full_attention", str)
        bad = sorted({t for t in layer_types} - {"full_attention", "sliding_attention"})
        if bad:
            raise StepstreamError(f"{source}: layer_types holds unknown types {bad}")
        sliding = tuple(t == "sliding_attention" for t in layer_types)
        rotary = per_block("partial_rotary_factors", 0.5)
        for i, (s, r) in enumerate(zip(sliding, rotary)):
            if r != (1.0 if s else 0.5):
                raise StepstreamError(f"{source}: partial_rotary_factors[{i}]={r} but layer {i} is {layer_types[i]}; Step-3.5 rotates all dims on sliding layers and half on full ones")

        other = raw.get("attention_other_setting") or {}
        n_head_full = int(need("num_attention_heads"))
        n_kv_full = int(need("num_attention_groups"))
        n_head_swa = int(other.get("num_attention_heads", n_head_full))
        n_kv_swa = int(other.get("num_attention_groups", n_kv_full))
        n_head = tuple(n_head_swa if s else n_head_full for s in sliding)
        n_head_kv = tuple(n_kv_swa if s else n_kv_full for s in sliding)
        for i, (h, kv) in enumerate(zip(n_head, n_head_kv)):
            if kv <= 0 or h % kv:
                raise StepstreamError(f"{source}: layer {i} has {h} query heads, not a multiple of its {kv} KV groups")

        theta = raw.get("rope_theta", 10000.0)
        if isinstance(theta, list):
            full = [float(t) for t, s in zip(theta, sliding) if not s]
            swa = [float(t) for t, s in zip(theta, sliding) if s]
            theta_full = full[0] if full else float(theta[0])
            theta_swa = swa[0] if swa else theta_full
            if len(set(full)) > 1 or len(set(swa)) > 1:
                raise StepstreamError(f"{source}: rope_theta varies within one attention type ({sorted(set(full))} / {sorted(set(swa))}); GGUF stores one base per type")
        else:
            theta_full = theta_swa = float(theta)

        moe_enum = raw.get("moe_layers_enum")
        if isinstance(moe_enum, str) and moe_enum.strip():
            moe_layers = frozenset(int(v) for v in moe_enum.split(","))
        elif isinstance(moe_enum, list):
            moe_layers = frozenset(int(v) for v in moe_enum)
        else:
            moe_layers = frozenset(range(1, n_layers))
        if any(not 0 <= i < n_layers for i in moe_layers):
            raise StepstreamError(f"{source}: moe_layers_enum names layers outside 0..{n_layers - 1}")

        scaling = raw.get("rope_scaling")
        if scaling is not None:
            kind = str(scaling.get("rope_type", scaling.get("type", ""))).lower()
            if kind != "llama3":
                raise StepstreamError(f"{source}: rope_scaling type {kind!r} is not supported (only llama3)")

        cfg = cls(
            hidden_size=int(need("hidden_size")),
            n_layers=n_layers,
            n_mtp=n_mtp,
            vocab_size=int(need("vocab_size")),
            head_dim=int(need("head_dim")),
            sliding=sliding,
            n_head=n_head,
            n_head_kv=n_head_kv,
            rotary_factor=rotary,
            sliding_window=int(need("sliding_window")),
            rope_theta_full=theta_full,
            rope_theta_sliding=theta_swa,
            rope_scaling=scaling,
            intermediate_size=int(need("intermediate_size")),
            moe_layers=moe_layers,
            n_expert=int(need("moe_num_experts")),
            n_expert_used=int(need("moe_top_k")),
            expert_ffn=int(need("moe_intermediate_size")),
            shared_ffn=int(raw.get("share_expert_dim", need("moe_intermediate_size"))),
            router_scale=float(raw.get("moe_router_scaling_factor", 1.0)),
            norm_expert_weight=bool(raw.get("norm_expert_weight", True)),
            use_router_bias=bool(raw.get("use_moe_router_bias", True)),
            swiglu_limit=per_block("swiglu_limits", 0.0),
            swiglu_limit_shared=per_block("swiglu_limits_shared", 0.0),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-5)),
            max_position_embeddings=int(raw.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            raw=raw,
        )
        if not 0 < cfg.n_expert_used <= cfg.n_expert:
            raise StepstreamError(f"{source}: moe_top_k={cfg.n_expert_used} must be in 1..moe_num_experts={cfg.n_expert}")
        return cfg
