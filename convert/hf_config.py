"""The Hugging Face `config.json` of a Step-3.5 checkpoint, parsed and validated once.

Layer indices run over trunk layers 0..n_layers-1 and then the MTP blocks
n_layers..n_layers+n_mtp-1 (the checkpoint stores them as `model.layers.{n_layers+j}`).
Per-layer lists in the config (`layer_types`, `partial_rotary_factors`, `rope_theta`,
`swiglu_limits*`) may or may not cover the MTP blocks: missing entries follow
llama.cpp's converter (full attention, rotary 0.5, no clamp).

Every value is read through `JsonFields`, which checks its JSON type (a bool is not a
number) and names the file, the key and the value when it is wrong; the checkpoint's
other JSON files (tokenizer.json, tokenizer_config.json) are read with the same helpers.
A null optional key means its default, as in transformers' config classes.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

from runtime.base.errors import StepstreamError

ARCHITECTURE = "Step3p5ForCausalLM"
MODEL_TYPE = "step3p5"
# Step3p5Config's default for both max_position_embeddings and max_seq_len: what transformers and
# vLLM use for a config.json that names neither.
DEFAULT_CONTEXT = 262144
MAX_CONTEXT = 2**31 - 1  # positions are int32 in llama.cpp (llama_pos)


def warn(message: str) -> None:
    """One line on stderr for input the converter accepts but the user should know about."""
    print(f"warning: {message}", file=sys.stderr, flush=True)


def read_text(path: Path) -> str:
    """A checkpoint file's text, which must be UTF-8 (transformers and llama.cpp read it as UTF-8)."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise StepstreamError(f"{path}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); "
                              "save it as UTF-8") from None


def read_json_object(path: Path) -> tuple[dict, str]:
    """(the JSON object in `path`, its text); FileNotFoundError is left to the caller, which knows
    whether the file is optional."""
    text = read_text(path)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise StepstreamError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(value, dict):
        raise StepstreamError(f"{path}: must hold a JSON object, got {shown(value)}")
    return value, text


def shown(value) -> str:
    """A JSON value as the file spells it, cut short for an error line."""
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return (isinstance(v, float) and math.isfinite(v)) or _is_int(v)


# Python type asked for -> (what an error calls it, whether a JSON value is one)
_KINDS = {
    int: ("integer", _is_int),
    float: ("number", _is_number),
    bool: ("boolean (true or false)", lambda v: isinstance(v, bool)),
    str: ("string", lambda v: isinstance(v, str)),
    dict: ("object", lambda v: isinstance(v, dict)),
    list: ("array", lambda v: isinstance(v, list)),
}
_BOUNDS = {"positive": lambda v: v > 0, "non-negative": lambda v: v >= 0}
REQUIRED = object()


class JsonFields:
    """A JSON object's values, read with their types checked; errors name the file, the key and the value."""

    def __init__(self, raw: dict, source: str, prefix: str = ""):
        self.raw, self.source, self.prefix = raw, source, prefix

    def get(self, key: str, kind: type, default=REQUIRED, bound: str | None = None):
        """raw[key] as `kind` (within `bound`), or `default` when it is absent or null."""
        value = self.raw.get(key)
        if value is None and default is not REQUIRED:
            return default
        if key not in self.raw:
            raise StepstreamError(f"{self.source}: missing required key {self.prefix + key!r}")
        return self.check(value, kind, key, bound)

    def check(self, value, kind: type, label: str, bound: str | None = None):
        """`value` (found at `label`) as `kind`, or one line naming the file, the key and the value."""
        noun, is_kind = _KINDS[kind]
        if not is_kind(value) or (bound is not None and not _BOUNDS[bound](value)):
            what = f"{bound} {noun}" if bound else noun
            article = "an" if what[0] in "aeiou" else "a"
            raise StepstreamError(f"{self.source}: {self.prefix}{label} must be {article} {what}, got {shown(value)}")
        return float(value) if kind is float else value

    def nested(self, key: str) -> "JsonFields | None":
        """The object at `key` (None when absent or null), read with the same checks."""
        value = self.get(key, dict, None)
        return None if value is None else JsonFields(value, self.source, f"{self.prefix}{key}.")


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
    max_position_embeddings: int  # max_position_embeddings, else max_seq_len, else DEFAULT_CONTEXT
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
            raw, _ = read_json_object(path)
        except FileNotFoundError:
            raise StepstreamError(f"{path}: not found; a Hugging Face checkpoint directory needs config.json") from None
        return cls.from_dict(raw, source=str(path))

    @classmethod
    def from_dict(cls, raw: dict, source: str = "config.json") -> "HFConfig":
        if not isinstance(raw, dict):
            raise StepstreamError(f"{source}: must hold a JSON object, got {shown(raw)}")
        archs = raw.get("architectures") or []
        if ARCHITECTURE not in archs and raw.get("model_type") != MODEL_TYPE:
            raise StepstreamError(
                f"{source}: not a Step-3.5 config (architectures={archs}, model_type={raw.get('model_type')!r}); "
                f"expected {ARCHITECTURE!r} / {MODEL_TYPE!r}"
            )
        r = _Fields(raw, source)
        size = r.size
        sliding, rotary = _layer_types(r)
        n_head, n_head_kv = _heads(r, sliding)
        theta_full, theta_swa, scaling = _rope(r, sliding)
        cfg = cls(
            hidden_size=size("hidden_size"),
            n_layers=r.n_layers,
            n_mtp=r.n_mtp,
            vocab_size=size("vocab_size"),
            head_dim=size("head_dim"),
            sliding=sliding,
            n_head=n_head,
            n_head_kv=n_head_kv,
            rotary_factor=rotary,
            sliding_window=size("sliding_window"),
            rope_theta_full=theta_full,
            rope_theta_sliding=theta_swa,
            rope_scaling=scaling,
            intermediate_size=size("intermediate_size"),
            moe_layers=_moe_layers(r),
            n_expert=size("moe_num_experts"),
            n_expert_used=size("moe_top_k"),
            expert_ffn=size("moe_intermediate_size"),
            shared_ffn=r.get("share_expert_dim", int, size("moe_intermediate_size"), "positive"),
            router_scale=r.get("moe_router_scaling_factor", float, 1.0, "positive"),
            norm_expert_weight=r.get("norm_expert_weight", bool, True),
            use_router_bias=r.get("use_moe_router_bias", bool, True),
            swiglu_limit=r.per_block("swiglu_limits", 0.0, float, "non-negative"),
            swiglu_limit_shared=r.per_block("swiglu_limits_shared", 0.0, float, "non-negative"),
            rms_norm_eps=r.get("rms_norm_eps", float, 1e-5, "positive"),
            max_position_embeddings=_context_length(r),
            tie_word_embeddings=r.get("tie_word_embeddings", bool, False),
            raw=raw,
        )
        if not cfg.n_expert_used <= cfg.n_expert:
            raise StepstreamError(f"{source}: moe_top_k={cfg.n_expert_used} must be in 1..moe_num_experts={cfg.n_expert}")
        return cfg


class _Fields(JsonFields):
    """config.json's values, with the block counts that per-layer lists are read against."""

    def __init__(self, raw: dict, source: str):
        super().__init__(raw, source)
        self.n_layers = self.size("num_hidden_layers")
        self.n_mtp = self.get("num_nextn_predict_layers", int, 0, "non-negative")
        self.n_blocks = self.n_layers + self.n_mtp

    def size(self, key: str) -> int:
        """A required count or dimension: a positive integer."""
        return self.get(key, int, bound="positive")

    def per_block(self, key: str, default, kind: type = float, bound: str | None = None) -> tuple:
        """One value per block (trunk and MTP): a list (MTP blocks may be left out, null entries
        take the default), or one value for all."""
        values = self.raw.get(key)
        if values is None:
            return tuple([default] * self.n_blocks)
        if not isinstance(values, list):
            return tuple([self.check(values, kind, key, bound)] * self.n_blocks)
        if len(values) < self.n_layers:
            raise StepstreamError(f"{self.source}: {key} has {len(values)} entries, fewer than "
                                  f"num_hidden_layers={self.n_layers}")
        values = [default if v is None else self.check(v, kind, f"{key}[{i}]", bound)
                  for i, v in enumerate(values[:self.n_blocks])]
        return tuple(values + [default] * (self.n_blocks - len(values)))


def _layer_types(r: _Fields) -> tuple[tuple[bool, ...], tuple[float, ...]]:
    """(sliding per block, rotary factor per block), checked against each other."""
    layer_types = r.per_block("layer_types", "full_attention", str)
    bad = sorted({t for t in layer_types} - {"full_attention", "sliding_attention"})
    if bad:
        raise StepstreamError(f"{r.source}: layer_types holds unknown types {bad}")
    sliding = tuple(t == "sliding_attention" for t in layer_types)
    if r.raw.get("partial_rotary_factors") is None and any(sliding):  # the default, 0.5, fits full layers only
        want = [1.0 if s else 0.5 for s in sliding[:r.n_layers]]
        raise StepstreamError(f"{r.source}: partial_rotary_factors is missing; Step-3.5 rotates all dims on sliding "
                              f"layers and half on full ones: {json.dumps(want)} for these layer_types")
    rotary = r.per_block("partial_rotary_factors", 0.5)
    for i, (s, f) in enumerate(zip(sliding, rotary)):
        if f != (1.0 if s else 0.5):
            raise StepstreamError(f"{r.source}: partial_rotary_factors[{i}]={f} but layer {i} is {layer_types[i]}; "
                                  "Step-3.5 rotates all dims on sliding layers and half on full ones")
    return sliding, rotary


def _heads(r: _Fields, sliding) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Query heads and KV groups per block (sliding blocks may have their own counts)."""
    other = r.nested("attention_other_setting") or JsonFields({}, r.source)
    n_head_full, n_kv_full = r.size("num_attention_heads"), r.size("num_attention_groups")
    n_head_swa = other.get("num_attention_heads", int, n_head_full, "positive")
    n_kv_swa = other.get("num_attention_groups", int, n_kv_full, "positive")
    n_head = tuple(n_head_swa if s else n_head_full for s in sliding)
    n_head_kv = tuple(n_kv_swa if s else n_kv_full for s in sliding)
    for i, (h, kv) in enumerate(zip(n_head, n_head_kv)):
        if h % kv:
            raise StepstreamError(f"{r.source}: layer {i} has {h} query heads, not a multiple of its {kv} KV groups")
    return n_head, n_head_kv


DEFAULT_ROPE_THETA = 10000.0  # transformers' PretrainedConfig default, used when a config names no base


def _rope(r: _Fields, sliding) -> tuple[float, float, dict | None]:
    """RoPE bases of full and sliding blocks and the full blocks' llama3 scaling (see _rope_of)."""
    theta_full, theta_swa, scaling = _rope_of(r, sliding)
    # StepFun's configs name the layer types the scaling applies to at the top level (a review:
    # only the key inside rope_scaling was read); GGUF scales the full-attention layers only.
    only = r.get("yarn_only_types", list, None)
    if scaling is not None and only is not None and \
            [r.check(t, str, "yarn_only_types[]") for t in only] not in ([], ["full_attention"]):
        raise StepstreamError(f"{r.source}: yarn_only_types {shown(only)} scales other layers than the "
                              f"full-attention ones; GGUF scales the full-attention layers only")
    return theta_full, theta_swa, scaling


def _rope_of(r: _Fields, sliding) -> tuple[float, float, dict | None]:
    """RoPE bases of full and sliding blocks and the full blocks' llama3 scaling, from
    transformers v4's `rope_theta` + `rope_scaling`, or v5's `rope_parameters` (one object for
    every layer, or one per layer type: `full_attention`, `sliding_attention`)."""
    if r.raw.get("rope_theta") is not None or r.raw.get("rope_parameters") is None:
        scaling = r.nested("rope_scaling")
        return (*_rope_theta(r, sliding, scaling), _rope_scaling(scaling, r.source))
    params = r.nested("rope_parameters")
    if {"full_attention", "sliding_attention"} & params.raw.keys():
        full, swa = params.nested("full_attention"), params.nested("sliding_attention")
        full, swa = full or swa, swa or full
    else:
        full = swa = params
    if swa is not full and _rope_scaling(swa, r.source) is not None:
        raise StepstreamError(f"{r.source}: rope_parameters.sliding_attention scales RoPE; GGUF scales the "
                              "full-attention layers only")
    bases = [p.get("rope_theta", float, None, "positive") for p in (full, swa)]
    if None in bases:
        _no_base(r.source)
    theta_full, theta_swa = (DEFAULT_ROPE_THETA if b is None else b for b in bases)
    return theta_full, theta_swa, _rope_scaling(full, r.source)


def _no_base(source) -> None:
    warn(f"{source}: no rope_theta; using transformers' default base {DEFAULT_ROPE_THETA:g}, which may not be "
         "the base this model was trained with")


def _rope_theta(r: _Fields, sliding, scaling: JsonFields | None) -> tuple[float, float]:
    """RoPE bases of full and sliding blocks: one value, or a per-layer list with one base per type.
    Without `rope_theta`, a base inside `rope_scaling` (as some transformers versions save it),
    else transformers' default, with a warning: a wrong base runs, with wrong positions."""
    if r.raw.get("rope_theta") is None:
        if scaling is not None and (theta := scaling.get("rope_theta", float, None, "positive")) is not None:
            return theta, theta
        _no_base(r.source)
        return DEFAULT_ROPE_THETA, DEFAULT_ROPE_THETA
    if not isinstance(r.raw.get("rope_theta"), list):
        theta = r.get("rope_theta", float, DEFAULT_ROPE_THETA, "positive")
        return theta, theta
    theta = r.per_block("rope_theta", None, float, "positive")
    full = sorted({t for t, s in zip(theta, sliding) if t is not None and not s})
    swa = sorted({t for t, s in zip(theta, sliding) if t is not None and s})
    if len(full) > 1 or len(swa) > 1:
        raise StepstreamError(f"{r.source}: rope_theta varies within one attention type ({full} / {swa}); "
                              "GGUF stores one base per type")
    if not full and not swa:
        raise StepstreamError(f"{r.source}: rope_theta lists no base (every entry is null)")
    theta_full = full[0] if full else swa[0]
    return theta_full, swa[0] if swa else theta_full


def _moe_layers(r: _Fields) -> frozenset[int]:
    """moe_layers_enum: "1,2,3" (StepFun's spelling) or a list of layer numbers; absent or empty means
    every layer but the first, as Step3p5's modeling code does."""
    moe_enum = r.raw.get("moe_layers_enum")
    if isinstance(moe_enum, str) and moe_enum.strip():
        pieces = [p.strip() for p in moe_enum.split(",")]
        if not all(p.isdigit() for p in pieces):
            raise StepstreamError(f"{r.source}: moe_layers_enum must list layer numbers separated by commas, "
                                  f"got {shown(moe_enum)}")
        moe_layers = frozenset(int(p) for p in pieces)
    elif isinstance(moe_enum, list):
        moe_layers = frozenset(r.check(v, int, f"moe_layers_enum[{i}]") for i, v in enumerate(moe_enum))
    elif moe_enum is None or isinstance(moe_enum, str):
        moe_layers = frozenset(range(1, r.n_layers))
    else:
        raise StepstreamError(f"{r.source}: moe_layers_enum must be a string of layer numbers or a list, "
                              f"got {shown(moe_enum)}")
    if any(not 0 <= i < r.n_layers for i in moe_layers):
        raise StepstreamError(f"{r.source}: moe_layers_enum names layers outside 0..{r.n_layers - 1}")
    return moe_layers


def _rope_scaling(scaling: JsonFields | None, source) -> dict | None:
    """llama3-style scaling, its values type-checked (nulls left out, so readers' defaults apply);
    None for none: absent, an empty object, or transformers' type "default" (plain RoPE, which
    newer transformers writes when it saves a config)."""
    if scaling is None:
        return None
    kind = scaling.get("rope_type", str, None) or scaling.get("type", str, "")
    if kind.lower() in ("", "default"):
        return None
    if kind.lower() != "llama3":
        where = scaling.prefix.rstrip(".") or "rope_scaling"
        raise StepstreamError(f"{source}: {where} type {kind!r} is not supported (only llama3, or default: none)")
    only = scaling.get("yarn_only_types", list, None)  # StepFun's: the layer types the scaling applies to
    if only is not None and [scaling.check(t, str, "yarn_only_types[]") for t in only] != ["full_attention"]:
        raise StepstreamError(f"{source}: {scaling.prefix}yarn_only_types {shown(only)} scales other layers than the "
                              f"full-attention ones; GGUF scales the full-attention layers only")
    out = {"rope_type": kind}
    for key in ("factor", "low_freq_factor", "high_freq_factor"):
        if (value := scaling.get(key, float, None, "positive")) is not None:
            out[key] = value
    if (old := scaling.get("original_max_position_embeddings", int, None, "positive")) is not None:
        out["original_max_position_embeddings"] = old
    lo, hi = out.get("low_freq_factor", 1.0), out.get("high_freq_factor", 4.0)  # gguf_meta's defaults
    if not lo < hi:  # the smoothing between them divides by hi - lo
        raise StepstreamError(f"{source}: {scaling.prefix}low_freq_factor ({lo:g}) must be below high_freq_factor "
                              f"({hi:g})")
    return out


def _context_length(r: _Fields) -> int:
    """max_position_embeddings, else max_seq_len (Step3p5Config defines both), else their default."""
    for key in ("max_position_embeddings", "max_seq_len"):
        if (n := r.get(key, int, None, "positive")) is not None:
            if n > MAX_CONTEXT:
                raise StepstreamError(f"{r.source}: {key} must be at most {MAX_CONTEXT} (llama.cpp's int32 "
                                      f"positions), got {n}")
            return n
    warn(f"{r.source}: neither max_position_embeddings nor max_seq_len is set; context length "
         f"{DEFAULT_CONTEXT}, Step3p5Config's default")
    return DEFAULT_CONTEXT
