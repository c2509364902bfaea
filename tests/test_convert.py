"""The converter's output: llama.cpp loads every type, names and metadata follow llama.cpp's step35."""

import json
import subprocess
import sys

import gguf
import numpy as np
import pytest
from tokenizers import Tokenizer

from tests.helpers.llama import llama_cpp_logits
from convert import layout, policy
from convert.hf_config import HFConfig
from convert.mini import write_mini
from runtime.base.gguf_schema import Key

Q = gguf.GGMLQuantizationType


def field(reader, key):
    f = reader.fields[key]
    if f.types[0] == gguf.GGUFValueType.ARRAY:
        return [f.parts[i].tolist()[0] if f.types[-1] != gguf.GGUFValueType.STRING else bytes(f.parts[i]).decode()
                for i in f.data]
    v = f.parts[f.data[0]]
    return bytes(v).decode() if f.types[0] == gguf.GGUFValueType.STRING else v.tolist()[0]


@pytest.mark.parametrize("ftype", policy.TYPES)
def test_every_type_loads_in_llama_cpp(tiny_gguf, tiny_ckpt, ftype):
    path = tiny_gguf(ftype)
    tok = Tokenizer.from_file(str(tiny_ckpt / "tokenizer.json"))
    ids = tok.encode("import os\nprint(os.getcwd())\n").ids
    logits = llama_cpp_logits(path, ids)
    assert logits.shape == (len(ids), HFConfig.load(tiny_ckpt).vocab_size)
    assert np.isfinite(logits).all() and logits.std() > 0.1


def test_formats_follow_the_policy(tiny_gguf, tiny_ckpt):
    cfg = HFConfig.load(tiny_ckpt)
    reader = gguf.GGUFReader(tiny_gguf("q4_k_m"))
    types = {t.name: t.tensor_type for t in reader.tensors}
    for spec in layout.checkpoint_layout(cfg):
        want = {layout.EXPERTS: Q.Q4_K, layout.NORM: Q.F32, layout.ROUTER: Q.F32, layout.ROUTER_BIAS: Q.F32}.get(spec.role, Q.Q6_K)
        assert types[spec.gguf_name] == want, spec.gguf_name
    assert field(reader, "general.file_type") == gguf.LlamaFileType.MOSTLY_Q4_K_M


def test_names_metadata_and_mtp_blocks(tiny_gguf, tiny_ckpt):
    cfg = HFConfig.load(tiny_ckpt)
    reader = gguf.GGUFReader(tiny_gguf("f32"))
    names = {t.name for t in reader.tensors}
    assert {s.gguf_name for s in layout.checkpoint_layout(cfg)} == names
    for j in range(3):
        i = cfg.n_layers + j
        for part in ("eh_proj", "enorm", "hnorm", "shared_head_norm", "shared_head_head"):
            assert f"blk.{i}.nextn.{part}.weight" in names
    assert field(reader, "general.architecture") == "step35"
    assert field(reader, "step35.block_count") == cfg.n_blocks
    assert field(reader, "step35.nextn_predict_layers") == 3
    assert field(reader, "step35.attention.head_count") == list(cfg.n_head)
    assert field(reader, "step35.attention.sliding_window_pattern") == list(cfg.sliding)
    assert field(reader, "step35.rope.freq_base") == cfg.rope_theta_full
    assert field(reader, "step35.rope.freq_base_swa") == cfg.rope_theta_sliding
    assert field(reader, "step35.expert_weights_scale") == pytest.approx(3.0)
    assert field(reader, "step35.swiglu_clamp_exp") == pytest.approx(list(cfg.swiglu_limit))
    assert field(reader, "step35.leading_dense_block_count") == 1
    # expert slices are contiguous, in expert order, shaped like llama.cpp's {H, I, E}
    t = next(t for t in reader.tensors if t.name == "blk.1.ffn_up_exps.weight")
    assert list(t.shape) == [cfg.hidden_size, cfg.expert_ffn, cfg.n_expert]
    from convert.safetensors_io import Checkpoint
    ck = Checkpoint(tiny_ckpt)
    np.testing.assert_array_equal(np.asarray(t.data)[5], ck.read("model.layers.1.moe.up_proj.weight", 5))
    norm = next(t for t in reader.tensors if t.name == "blk.0.attn_norm.weight")
    np.testing.assert_allclose(np.asarray(norm.data), ck.read("model.layers.0.input_layernorm.weight") + 1, rtol=0, atol=0)


def test_tokenizer_metadata_and_llama_cpp_tokenization(tiny_gguf, tiny_ckpt):
    import llama_cpp

    path = tiny_gguf("q8_0")
    reader = gguf.GGUFReader(path)
    hf_json = field(reader, Key.HF_JSON)
    assert hf_json == (tiny_ckpt / "tokenizer.json").read_text()
    assert field(reader, "tokenizer.ggml.model") == "gpt2"
    assert field(reader, "tokenizer.ggml.pre") == "qwen2"
    assert "<|im_start|>" in field(reader, "tokenizer.chat_template")
    original = Tokenizer.from_file(str(tiny_ckpt / "tokenizer.json"))
    rebuilt = Tokenizer.from_str(hf_json)
    text = ("The quick brown fox's 3 dogs weren't there.\n\n"
            "東京は日本の首都です。ひらがなとカタカナ、漢字。\n"
            "def fib(n: int) -> int:\n\tif n < 2:\n\t\treturn n  # base case\n    return fib(n-1)+fib(n-2)\n"
            "   trailing spaces   \r\n émojis 🙂🚀 and ünïcode, Привет мир 12345")
    want = original.encode(text).ids
    assert rebuilt.encode(text).ids == want
    tokens = field(reader, "tokenizer.ggml.tokens")
    assert [tokens[i] for i in want] == original.encode(text).tokens
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    try:
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == want
        assert llm.tokenize(b"hi", add_bos=True)[0] == original.token_to_id("<|begin_of_text|>")
        assert llm.token_eos() == original.token_to_id("<|im_end|>")
    finally:
        llm.close()


def test_summary_and_atomic_output(tiny_ckpt, tmp_path):
    out = tmp_path / "m.gguf"
    js = tmp_path / "s.json"
    r = subprocess.run([sys.executable, "-m", "runtime.cli", "convert", str(tiny_ckpt), str(out), "--type", "q4_k_m",
                        "--summary-json", str(js)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "bits/weight" in r.stdout and "peak RSS" in r.stdout
    assert "%" in r.stderr  # tqdm progress bar with bytes
    assert "loading the quantizers..." in r.stderr  # compiled or loaded before the bar starts timing
    s = json.loads(js.read_text())
    assert s["n_tensors"] == len(gguf.GGUFReader(out).tensors)
    assert 4.5 < s["bits_per_weight"] < 6.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf", "s.json"]


def test_skipped_tensors_are_accounted(tiny_ckpt, tmp_path):
    import shutil
    import struct

    d = tmp_path / "ck"
    shutil.copytree(tiny_ckpt, d)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    shard = d / index["weight_map"]["model.norm.weight"]
    raw = shard.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    end = max(v["data_offsets"][1] for k, v in header.items() if k != "__metadata__")
    name = "model.layers.0.self_attn.rotary_emb.inv_freq"
    header[name] = {"dtype": "F32", "shape": [64], "data_offsets": [end, end + 256]}
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    shard.write_bytes(struct.pack("<Q", len(blob)) + blob + raw[8 + n:] + bytes(256))
    index["weight_map"][name] = shard.name
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    from convert.converter import convert
    s = convert(d, tmp_path / "o.gguf", "f16", progress=False)
    assert name in s.skipped and "rope_theta" in s.skipped[name]
    assert name not in {t.name for t in gguf.GGUFReader(tmp_path / "o.gguf").tensors}


BOUND = 64 * 2**20  # RSS the converter may add on top of its start, whatever the model size


@pytest.mark.slow
def test_peak_rss_does_not_grow_with_model_size(tmp_path):
    ckpt = write_mini(tmp_path / "stress", "stress", seed=3)
    size = sum(p.stat().st_size for p in ckpt.glob("*.safetensors"))
    assert size >= 10 * BOUND, f"checkpoint {size / 2**20:.0f} MiB is not 10x the {BOUND / 2**20:.0f} MiB bound"
    js = tmp_path / "s.json"
    r = subprocess.run([sys.executable, "-m", "runtime.cli", "convert", str(ckpt), str(tmp_path / "s.gguf"),
                        "--type", "q8_0", "--no-progress", "--summary-json", str(js)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    s = json.loads(js.read_text())
    grown = s["peak_rss_bytes"] - s["start_rss_bytes"]
    assert grown <= BOUND, f"converter RSS grew by {grown / 2**20:.0f} MiB converting {size / 2**20:.0f} MiB"
