"""Weights and config of the float64 reference (tests.helpers.reference_model).

Weights come in one form, a mapping from GGUF tensor name to a float64 array in numpy
(HF) order with the zero-centred norms already turned into `1 + w`. Two loaders make it:
  - `hf_weights(ckpt_dir)`: straight from the Hugging Face safetensors;
  - `gguf_weights(path)`: any GGUF (ours or llama.cpp's, split or not), dequantized
    with `gguf.quants.dequantize`, so quantized files get a reference on the very
    weights they hold.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from convert import layout
from convert.hf_config import HFConfig
from convert.safetensors_io import Checkpoint


# ----------------------------------------------------------------------------- config


@dataclass(frozen=True)
class RefConfig:
    n_layers: int  # trunk blocks; MTP blocks follow
    n_mtp: int
    hidden: int
    vocab: int
    head_dim: int
    sliding: tuple[bool, ...]  # per block (trunk + MTP)
    n_head: tuple[int, ...]
    n_head_kv: tuple[int, ...]
    window: int
    theta_full: float
    theta_sliding: float
    rope_factors: tuple[float, ...] | None  # llama3 scaling, divides the full layers' frequencies
    moe: tuple[bool, ...]
    n_expert_used: int
    router_scale: float
    norm_expert_weight: bool
    limit: tuple[float, ...]  # routed experts, per block
    limit_shared: tuple[float, ...]  # shared expert and dense MLPs, per block
    eps: float

    @staticmethod
    def from_hf(cfg: HFConfig) -> "RefConfig":
        factors = None
        if cfg.rope_scaling is not None:
            factors = llama3_rope_factors(cfg.rope_theta_full, cfg.head_dim // 2, cfg.rope_scaling)
        return RefConfig(
            n_layers=cfg.n_layers, n_mtp=cfg.n_mtp, hidden=cfg.hidden_size, vocab=cfg.vocab_size,
            head_dim=cfg.head_dim, sliding=cfg.sliding, n_head=cfg.n_head, n_head_kv=cfg.n_head_kv,
            window=cfg.sliding_window, theta_full=cfg.rope_theta_full, theta_sliding=cfg.rope_theta_sliding,
            rope_factors=factors, moe=tuple(cfg.is_moe(i) for i in range(cfg.n_blocks)),
            n_expert_used=cfg.n_expert_used, router_scale=cfg.router_scale,
            norm_expert_weight=cfg.norm_expert_weight, limit=cfg.swiglu_limit,
            limit_shared=cfg.swiglu_limit_shared, eps=cfg.rms_norm_eps,
        )


def llama3_rope_factors(theta: float, rotary_dim: int, scaling: dict) -> tuple[float, ...]:
    """Per-frequency divisors of llama3 rope scaling, for a rotary width of `rotary_dim` dims."""
    factor = float(scaling.get("factor", 8.0))
    lo = float(scaling.get("low_freq_factor", 1.0))
    hi = float(scaling.get("high_freq_factor", 4.0))
    old = float(scaling.get("original_max_position_embeddings", 8192))
    out = []
    for j in range(rotary_dim // 2):
        wavelen = 2 * math.pi * theta ** (2 * j / rotary_dim)
        if wavelen < old / hi:
            out.append(1.0)
        elif wavelen > old / lo:
            out.append(factor)
        else:
            smooth = (old / wavelen - lo) / (hi - lo)
            out.append(1.0 / ((1.0 - smooth) / factor + smooth))
    return tuple(out)


# ----------------------------------------------------------------------------- loaders


class LazyWeights(Mapping):
    """GGUF name -> float64 array, read on first access and kept."""

    def __init__(self, names, read):
        self._names = list(names)
        self._read = read
        self._cache: dict[str, np.ndarray] = {}

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._cache:
            if name not in self._names:
                raise KeyError(name)
            self._cache[name] = self._read(name)
        return self._cache[name]

    def __iter__(self):
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def hf_weights(ckpt_dir: str | Path) -> tuple[RefConfig, LazyWeights]:
    cfg = HFConfig.load(ckpt_dir)
    ckpt = Checkpoint(ckpt_dir)
    specs = {s.gguf_name: s for s in layout.checkpoint_layout(cfg)}

    def read(name: str) -> np.ndarray:
        spec = specs[name]
        w = ckpt.read(spec.hf_name).astype(np.float64)
        assert w.shape == spec.shape, (name, w.shape, spec.shape)
        return 1.0 + w if spec.role == layout.NORM else w

    return RefConfig.from_hf(cfg), LazyWeights(specs, read)


_REQUIRED = object()


def _field(reader, key: str, default=_REQUIRED):
    f = reader.fields.get(key)
    if f is None:
        if default is _REQUIRED:
            raise KeyError(key)
        return default
    return f.contents()


def round_q8(x: np.ndarray) -> np.ndarray:
    """x with each run of 256 values along the last axis rounded to int8 steps of max|x| / 127:
    what the runtime's q8 mode feeds its quantized matrix products."""
    s = x.reshape(*x.shape[:-1], -1, 256)
    d = np.abs(s).max(axis=-1, keepdims=True) / 127.0
    return (np.rint(s / np.where(d > 0, d, 1.0)) * d).reshape(x.shape)


class Int8Activations(np.ndarray):
    """A weight whose products `x @ W.T` round x with `round_q8` first."""

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        plain = [np.asarray(a) if isinstance(a, Int8Activations) else a for a in inputs]
        if ufunc is np.matmul and method == "__call__" and len(inputs) == 2 and inputs[1] is self:
            plain[0] = round_q8(np.asarray(plain[0], dtype=np.float64))
        return getattr(ufunc, method)(*plain, **kwargs)


Q8_ACTIVATION_TYPES = ("Q4_K", "Q5_K", "Q6_K", "Q8_0")


def gguf_weights(path: str | Path, q8_activations: bool = False) -> tuple[RefConfig, LazyWeights]:
    """Dequantized weights of a GGUF file; for a split file pass its first part. With
    q8_activations, the matrices of the formats the runtime's q8 mode runs on int8 activations
    (with a multiple of 256 columns) round their left operand as it does."""
    import gguf

    path = Path(path)
    m = re.match(r"(.*)-(\d{5})-of-(\d{5})\.gguf$", path.name)
    paths = [path] if m is None else [path.with_name(f"{m[1]}-{k:05d}-of-{m[3]}.gguf") for k in range(1, int(m[3]) + 1)]
    readers = [gguf.GGUFReader(p) for p in paths]
    r0 = readers[0]
    arch = _field(r0, "general.architecture")
    assert arch == "step35", arch

    def key(k, default=_REQUIRED):
        return _field(r0, f"step35.{k}", default)

    n_blocks = int(key("block_count"))
    n_mtp = int(key("nextn_predict_layers", 0))

    def per_block(k, default):
        v = key(k, default)
        return tuple(v) if isinstance(v, list) else tuple([v] * n_blocks)

    tensors = {t.name: t for r in readers for t in r.tensors}
    leading = int(key("leading_dense_block_count", 0))
    factors = None
    if "rope_freqs.weight" in tensors:
        factors = tuple(float(x) for x in np.asarray(tensors["rope_freqs.weight"].data, dtype=np.float64))
    cfg = RefConfig(
        n_layers=n_blocks - n_mtp, n_mtp=n_mtp, hidden=int(key("embedding_length")),
        vocab=int(tensors["token_embd.weight"].shape[1]),  # GGUF shapes are ne[]: [H, V]
        head_dim=int(key("attention.key_length")),
        sliding=tuple(bool(b) for b in key("attention.sliding_window_pattern")),
        n_head=tuple(int(x) for x in per_block("attention.head_count", _REQUIRED)),
        n_head_kv=tuple(int(x) for x in per_block("attention.head_count_kv", _REQUIRED)),
        window=int(key("attention.sliding_window")),
        theta_full=float(key("rope.freq_base", 10000.0)),
        theta_sliding=float(key("rope.freq_base_swa", key("rope.freq_base", 10000.0))),
        rope_factors=factors,
        moe=tuple(f"blk.{i}.ffn_gate_inp.weight" in tensors for i in range(n_blocks)),
        n_expert_used=int(key("expert_used_count")),
        router_scale=float(key("expert_weights_scale", 1.0)),
        norm_expert_weight=bool(key("expert_weights_norm", False)),
        limit=tuple(float(x) for x in per_block("swiglu_clamp_exp", 0.0)),
        limit_shared=tuple(float(x) for x in per_block("swiglu_clamp_shexp", 0.0)),
        eps=float(key("attention.layer_norm_rms_epsilon")),
    )
    assert leading == next((i for i, m in enumerate(cfg.moe) if m), cfg.n_layers), "leading_dense_block_count disagrees with the tensors"

    def read(name: str) -> np.ndarray:
        t = tensors[name]
        w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float64)
        w = w.reshape([int(d) for d in reversed(t.shape)])
        if q8_activations and t.tensor_type.name in Q8_ACTIVATION_TYPES and int(t.shape[0]) % 256 == 0:
            w = w.view(Int8Activations)
        return w

    return cfg, LazyWeights(tensors, read)
