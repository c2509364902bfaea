"""Step-3.5 hyperparameters as GGUF metadata, with the keys llama.cpp's converter writes.

Block counts include the MTP blocks, whose per-block entries follow the trunk's in every
array. No `rope.dimension_count` is written: llama.cpp's step35 loader derives the
rotated dims itself (head_dim on sliding layers, head_dim/2 on full ones).
"""

from __future__ import annotations

import math

import gguf
import numpy as np

from convert.hf_config import HFConfig

ARCH = "step35"


def add_hparams(w: gguf.GGUFWriter, cfg: HFConfig, name: str, file_type: int) -> None:
    w.add_name(name)
    w.add_file_type(int(file_type))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_block_count(cfg.n_blocks)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(list(cfg.n_head))
    w.add_head_count_kv(list(cfg.n_head_kv))
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_theta_full)
    w.add_rope_freq_base_swa(cfg.rope_theta_sliding)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_sliding_window(cfg.sliding_window)
    w.add_sliding_window_pattern(list(cfg.sliding))
    w.add_expert_count(cfg.n_expert)
    w.add_expert_used_count(cfg.n_expert_used)
    w.add_expert_feed_forward_length(cfg.expert_ffn)
    w.add_expert_shared_feed_forward_length(cfg.shared_ffn)
    w.add_expert_weights_scale(cfg.router_scale)
    w.add_expert_weights_norm(cfg.norm_expert_weight)
    w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
    w.add_leading_dense_block_count(cfg.n_leading_dense)
    w.add_moe_every_n_layers(1)
    w.add_swiglu_clamp_exp(list(cfg.swiglu_limit))
    w.add_swiglu_clamp_shexp(list(cfg.swiglu_limit_shared))
    if cfg.n_mtp:
        w.add_nextn_predict_layers(cfg.n_mtp)


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
