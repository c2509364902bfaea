"""Random-weight miniature Step-3.5 checkpoints in the exact Hugging Face layout.

A preset fixes the sizes; everything else (3:1 sliding/full layers, more sliding heads
than full heads, per-type rope bases, a dense lead layer, router bias, active SwiGLU
clamps, 3 MTP blocks) matches the released model's config. Weights are drawn with
scales that keep activations near unit RMS, so clamps bind and routing is non-trivial.
Each tensor's values depend only on (seed, tensor name), not on write order.
"""

from __future__ import annotations

import json
import os
import shutil
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from convert import layout
from convert.hf_config import HFConfig
from convert.mini_tokenizer import train_tokenizer, write_tokenizer_files
from convert.safetensors_io import SafetensorsWriter
from runtime.base.errors import StepstreamError


@dataclass(frozen=True)
class Preset:
    hidden: int
    n_layers: int  # trunk layers; layer 0 is dense
    head_dim: int
    n_head_full: int
    n_head_sliding: int
    n_kv: int
    n_expert: int
    n_expert_used: int
    expert_ffn: int
    shared_ffn: int
    dense_ffn: int
    vocab: int  # tokenizer vocab to train; config vocab is this rounded up to 64
    sliding_window: int
    n_shards: int
    about: str


PRESETS: dict[str, Preset] = {
    "tiny": Preset(256, 4, 128, 2, 4, 1, 16, 4, 256, 256, 512, 700, 16, 2,
                   "unit tests: 30 MB bf16, every dimension a multiple of 256"),
    "stress": Preset(256, 15, 128, 2, 4, 1, 128, 8, 256, 256, 512, 700, 32, 4,
                     "converter memory test: 727 MB bf16 of small tensors"),
    "large": Preset(1024, 9, 128, 8, 12, 2, 64, 8, 512, 512, 2048, 4000, 512, 4,
                    "benchmarks: 1.8 GB bf16, 542 MB as q4_k_m, 64 experts, top-8"),
}

N_MTP = 3


def make_config(p: Preset, vocab_size: int, clamps: tuple[float, float] = (0.75, 0.8)) -> dict:
    n_blocks = p.n_layers + N_MTP
    types = ["full_attention" if i % 4 == 0 else "sliding_attention" for i in range(n_blocks)]
    # Clamps: active on some layers only, as in the released config.
    limits = [0.0] * n_blocks
    limits_shared = [0.0] * n_blocks
    for i in range(1, p.n_layers, 2):
        limits[i] = clamps[0]
    for i in range(0, p.n_layers, 3):
        limits_shared[i] = clamps[1]
    return {
        "architectures": ["Step3p5ForCausalLM"],
        "model_type": "step3p5",
        "hidden_size": p.hidden,
        "num_hidden_layers": p.n_layers,
        "vocab_size": vocab_size,
        "num_attention_heads": p.n_head_full,
        "num_attention_groups": p.n_kv,
        "head_dim": p.head_dim,
        "intermediate_size": p.dense_ffn,
        "attention_other_setting": {
            "attention_type": "sliding_attention",
            "num_attention_heads": p.n_head_sliding,
            "num_attention_groups": p.n_kv,
            "head_dim": p.head_dim,
            "true_head_dim": p.head_dim,
        },
        "layer_types": types,
        "partial_rotary_factors": [1.0 if t == "sliding_attention" else 0.5 for t in types],
        "rope_theta": [1_000_000.0 if t == "full_attention" else 10_000.0 for t in types],
        "rope_scaling": None,
        "sliding_window": p.sliding_window,
        "max_position_embeddings": 65536,
        "rms_norm_eps": 1e-5,
        "moe_layers_enum": ",".join(str(i) for i in range(1, p.n_layers)),
        "moe_every_n_layer": 1,
        "moe_num_experts": p.n_expert,
        "moe_top_k": p.n_expert_used,
        "moe_intermediate_size": p.expert_ffn,
        "share_expert_dim": p.shared_ffn,
        "moe_router_activation": "sigmoid",
        "moe_router_scaling_factor": 3.0,
        "norm_expert_weight": True,
        "use_moe_router_bias": True,
        "need_fp32_gate": True,
        "swiglu_limits": limits,
        "swiglu_limits_shared": limits_shared,
        "num_nextn_predict_layers": N_MTP,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "bos_token_id": 0,
        "eos_token_id": 3,
    }


def _std(spec: layout.TensorSpec) -> float:
    if spec.role == layout.NORM:
        return 0.1
    if spec.role == layout.ROUTER_BIAS:
        return 0.05
    if spec.role == layout.EMBED:
        return 1.0
    return 1.0 / np.sqrt(spec.shape[-1])  # [out, in]: unit-RMS outputs for unit-RMS inputs


def tensor_values(spec: layout.TensorSpec, seed: int, index: int | None = None) -> np.ndarray:
    """The float32 values of one tensor (or one slice of its first axis)."""
    key = [seed, zlib.crc32(spec.hf_name.encode())] + ([] if index is None else [index + 1])
    rng = np.random.default_rng(key)
    shape = spec.shape if index is None else spec.shape[1:]
    return rng.standard_normal(shape, dtype=np.float32) * np.float32(_std(spec))


def _shard_plan(specs: list[layout.TensorSpec], n_shards: int) -> list[list[layout.TensorSpec]]:
    total = sum(s.n_elements for s in specs)
    shards: list[list[layout.TensorSpec]] = [[]]
    acc = 0
    for s in specs:
        if acc >= total * len(shards) / n_shards and len(shards) < n_shards:
            shards.append([])
        shards[-1].append(s)
        acc += s.n_elements
    return shards


def write_mini(out_dir: str | os.PathLike, preset: str = "tiny", seed: int = 0, progress: bool = False) -> Path:
    if preset not in PRESETS:
        raise StepstreamError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    p = PRESETS[preset]
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise StepstreamError(f"{out} exists and is not a directory; give a new directory")
    if out.exists() and any(out.iterdir()):
        raise StepstreamError(f"{out}: directory exists and is not empty")
    if not out.parent.is_dir():  # as every other output: a mistyped parent is not created
        raise StepstreamError(f"{out}: cannot write the checkpoint: the directory {out.parent} does not exist")
    tmp = out.with_name(out.name + ".part")
    shutil.rmtree(tmp, ignore_errors=True)
    try:  # before any work: a place where nothing can be made fails here, in one line
        tmp.mkdir()
    except OSError as e:
        raise StepstreamError(f"{out}: cannot write the checkpoint: cannot create {tmp.name} in "
                              f"{out.parent.absolute()} ({e.strerror})") from None
    try:
        _write_checkpoint(tmp, preset, p, seed, progress)
    except BaseException as e:  # Ctrl-C or a full disk: leave no half-written checkpoint behind
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):  # a full disk, a quota: one line, nothing left
            raise StepstreamError(f"{out}: cannot write the checkpoint: {e.strerror or e} (nothing was kept)") from None
        raise
    if out.exists():
        out.rmdir()
    os.replace(tmp, out)
    return out


def _write_checkpoint(tmp: Path, preset: str, p: Preset, seed: int, progress: bool) -> None:
    tok = train_tokenizer(p.vocab)
    vocab_size = -(-tok.get_vocab_size() // 64) * 64
    config = make_config(p, vocab_size)
    cfg = HFConfig.from_dict(config)
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    write_tokenizer_files(tok, tmp)

    specs = layout.checkpoint_layout(cfg)
    shards = _shard_plan(specs, p.n_shards)
    weight_map: dict[str, str] = {}
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=sum(s.n_elements * 2 for s in specs), unit="B", unit_scale=True, desc=f"mini {preset}")
    try:
        for k, shard in enumerate(shards):
            name = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
            w = SafetensorsWriter(tmp / name)
            for s in shard:
                w.add(s.hf_name, "F32" if s.role == layout.ROUTER_BIAS else "BF16", s.shape)
            for s in shard:
                if s.role == layout.EXPERTS:  # one expert at a time keeps memory flat
                    for e in range(s.shape[0]):
                        w.write(s.hf_name, tensor_values(s, seed, e)[None])
                else:
                    w.write(s.hf_name, tensor_values(s, seed))
                weight_map[s.hf_name] = name
                if bar:
                    bar.update(s.n_elements * 2)
            w.close()
    finally:
        if bar:
            bar.close()  # before an error's line, which is then the last one
    index = {"metadata": {"total_size": sum(s.n_elements * 2 for s in specs)}, "weight_map": weight_map}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
