"""Miniature checkpoints: the HF layout, config keys and tokenizer a real Step-3.5 has."""

import json

import numpy as np
import pytest
from tokenizers import Tokenizer

from convert import layout
from convert.hf_config import HFConfig
from convert.mini import PRESETS, write_mini
from convert.safetensors_io import Checkpoint, bf16_bits_to_f32, f32_to_bf16_bits
from runtime.base.errors import StepstreamError


def test_config_has_every_step35_feature(tiny_ckpt):
    raw = json.loads((tiny_ckpt / "config.json").read_text())
    cfg = HFConfig.load(tiny_ckpt)
    assert raw["architectures"] == ["Step3p5ForCausalLM"]
    assert cfg.n_mtp == 3 and cfg.n_blocks == cfg.n_layers + 3
    assert [s for s in cfg.sliding[:8]] == [False, True, True, True, False, True, True][: len(cfg.sliding[:8])]
    assert max(cfg.n_head) > min(cfg.n_head)  # sliding layers have more heads
    assert all(h == (raw["attention_other_setting"]["num_attention_heads"] if s else raw["num_attention_heads"])
               for h, s in zip(cfg.n_head, cfg.sliding))
    assert isinstance(raw["rope_theta"], list) and cfg.rope_theta_full != cfg.rope_theta_sliding
    assert raw["partial_rotary_factors"][:2] == [0.5, 1.0]
    assert 0 not in cfg.moe_layers and cfg.n_leading_dense == 1
    assert raw["use_moe_router_bias"] is True
    assert any(v > 0 for v in cfg.swiglu_limit) and any(v > 0 for v in cfg.swiglu_limit_shared)
    assert any(v == 0 for v in cfg.swiglu_limit)


def test_shards_index_and_layout(tiny_ckpt):
    index = json.loads((tiny_ckpt / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 2
    ckpt = Checkpoint(tiny_ckpt)
    cfg = HFConfig.load(tiny_ckpt)
    specs = layout.checkpoint_layout(cfg)
    assert sorted(ckpt.names()) == sorted(s.hf_name for s in specs)
    for s in specs:
        e = ckpt.entry(s.hf_name)
        assert e.shape == s.shape
        assert e.dtype == ("F32" if s.role == layout.ROUTER_BIAS else "BF16")
    assert "model.layers.4.transformer.shared_head.output.weight" in ckpt.names()
    assert "model.layers.6.eh_proj.weight" in ckpt.names()
    # an expert slice read alone equals the same slice of the whole tensor
    name = "model.layers.1.moe.down_proj.weight"
    np.testing.assert_array_equal(ckpt.read(name, 3), ckpt.read(name)[3])


def test_bf16_rounding_matches_gguf():
    import gguf.quants

    x = np.random.default_rng(1).standard_normal(4096).astype(np.float32) * 7
    ours = f32_to_bf16_bits(x)
    ref = gguf.quants.quantize(x.reshape(16, 256), gguf.GGMLQuantizationType.BF16).view(np.uint16).ravel()
    np.testing.assert_array_equal(ours, ref)
    np.testing.assert_array_equal(bf16_bits_to_f32(ours), gguf.quants.dequantize(ref.view(np.uint8).reshape(16, 512), gguf.GGMLQuantizationType.BF16).ravel())


def test_tokenizer_roundtrips_multilingual_text(tiny_ckpt):
    tok = Tokenizer.from_file(str(tiny_ckpt / "tokenizer.json"))
    text = "def f(x):\n    return x + 1  # 日本語のテキスト, émojis 🙂"
    assert tok.decode(tok.encode(text).ids) == text
    tcfg = json.loads((tiny_ckpt / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in tcfg["chat_template"]


def test_same_seed_same_weights_other_seed_differs(tmp_path, tiny_ckpt):
    again = write_mini(tmp_path / "again", "tiny", seed=0)
    other = write_mini(tmp_path / "other", "tiny", seed=1)
    name = "model.layers.2.moe.up_proj.weight"
    a, b, c = (Checkpoint(d).read(name, 5) for d in (tiny_ckpt, again, other))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_large_preset_meets_benchmark_requirements():
    from convert.mini import make_config

    p = PRESETS["large"]
    cfg = HFConfig.from_dict(make_config(p, 4032))
    dims = [cfg.hidden_size, cfg.expert_ffn, cfg.shared_ffn, cfg.intermediate_size] + \
           [h * cfg.head_dim for h in cfg.n_head] + [k * cfg.head_dim for k in cfg.n_head_kv]
    assert all(d % 256 == 0 for d in dims)
    assert cfg.n_expert >= 64 and cfg.n_expert_used == 8
    specs = layout.checkpoint_layout(cfg)
    expert_bits = sum(s.n_elements for s in specs if s.role == layout.EXPERTS) * 4.5
    assert expert_bits / 8 >= 400e6


def test_unknown_preset_and_nonempty_dir(tmp_path):
    with pytest.raises(StepstreamError, match="unknown preset"):
        write_mini(tmp_path / "x", "huge")
    (tmp_path / "y").mkdir()
    (tmp_path / "y" / "f").write_text("keep me")
    with pytest.raises(StepstreamError, match="not empty"):
        write_mini(tmp_path / "y", "tiny")
    assert (tmp_path / "y" / "f").read_text() == "keep me"
