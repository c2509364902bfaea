"""Step-3.5 hyperparameters as GGUF metadata, with the keys llama.cpp's converter writes.

Block counts include the MTP blocks, whose per-block entries follow the trunk's in every
array. No `rope.dimension_count` is written: llama.cpp's step35 loader derives the
rotated dims itself (head_dim on sliding layers, head_dim/2 on full ones).
"""

from __future__ import annotations

import math

import gguf
import numpy as np

from runtime.base.gguf_schema import GATING_SIGMOID, Key

from convert.hf_config import HFConfig


def add_hparams(w: gguf.GGUFWriter, cfg: HFConfig, name: str, file_type: int) -> None:
    """The general and step35 keys (runtime.base.gguf_schema), with the value types llama.cpp reads."""
    w.add_string(Key.NAME, name)
    w.add_uint32(Key.FILE_TYPE, int(file_type))
    w.add_uint32(Key.QUANTIZATION_VERSION, gguf.GGML_QUANT_VERSION)
    w.add_uint32(Key.BLOCK_COUNT, cfg.n_blocks)
    w.add_uint32(Key.CONTEXT_LENGTH, cfg.max_position_embeddings)
    w.add_uint32(Key.EMBEDDING_LENGTH, cfg.hidden_size)
    w.add_uint32(Key.FFN_LENGTH, cfg.intermediate_size)
    w.add_array(Key.HEAD_COUNT, list(cfg.n_head))
    w.add_array(Key.HEAD_COUNT_KV, list(cfg.n_head_kv))
    w.add_uint32(Key.KEY_LENGTH, cfg.head_dim)
    w.add_uint32(Key.VALUE_LENGTH, cfg.head_dim)
    w.add_float32(Key.ROPE_BASE, cfg.rope_theta_full)
    w.add_float32(Key.ROPE_BASE_SWA, cfg.rope_theta_sliding)
    w.add_float32(Key.RMS_EPS, cfg.rms_norm_eps)
    w.add_uint32(Key.SLIDING_WINDOW, cfg.sliding_window)
    w.add_array(Key.SLIDING_PATTERN, list(cfg.sliding))
    w.add_uint32(Key.EXPERT_COUNT, cfg.n_expert)
    w.add_uint32(Key.EXPERT_USED, cfg.n_expert_used)
    w.add_uint32(Key.EXPERT_FFN, cfg.expert_ffn)
    w.add_uint32(Key.SHARED_FFN, cfg.shared_ffn)
    w.add_float32(Key.EXPERT_SCALE, cfg.router_scale)
    w.add_bool(Key.EXPERT_NORM, cfg.norm_expert_weight)
    w.add_uint32(Key.EXPERT_GATING, GATING_SIGMOID)
    w.add_uint32(Key.LEADING_DENSE, cfg.n_leading_dense)
    w.add_uint32(Key.MOE_EVERY_N, 1)
    w.add_array(Key.CLAMP_EXP, list(cfg.swiglu_limit))
    w.add_array(Key.CLAMP_SHEXP, list(cfg.swiglu_limit_shared))
    if cfg.n_mtp:
        w.add_uint32(Key.NEXTN, cfg.n_mtp)


def llama3_rope_factors(cfg: HFConfig) -> np.ndarray | None:
    """Per-frequency divisors of llama3-style rope scaling, for the full-attention dims.

    Sliding layers rotate more dims than full ones; entries past the full layers'
    rotated half are 1 so the shared tensor leaves them unscaled.
    """
    if cfg.rope_scaling is None:
        return None
    s = cfg.rope_scaling
    rot = int(cfg.head_dim * 0.5)
    freqs = 1.0 / (cfg.rope_theta_full ** (np.arange(0, rot, 2, dtype=np.float64) / rot))
    factor = float(s.get("factor", 8.0))
    lo, hi = float(s.get("low_freq_factor", 1.0)), float(s.get("high_freq_factor", 4.0))
    old = float(s.get("original_max_position_embeddings", 8192))
    out = []
    for f in freqs:
        wavelen = 2 * math.pi / f
        if wavelen < old / hi:
            out.append(1.0)
        elif wavelen > old / lo:
            out.append(factor)
        else:
            smooth = (old / wavelen - lo) / (hi - lo)
            out.append(1.0 / ((1.0 - smooth) / factor + smooth))
    out += [1.0] * (cfg.head_dim // 2 - len(out))
    return np.asarray(out, dtype=np.float32)
