"""Loading GGUF files: split files, files llama.cpp wrote, and every kind of bad input."""

from __future__ import annotations

import ctypes

import gguf
import numpy as np
import pytest

import runtime
from tests.helpers.gguf_edit import rewrite
from runtime.base.errors import StepstreamError


@pytest.fixture(scope="module")
def f32_path(tiny_gguf):
    return tiny_gguf("f32")


@pytest.fixture(scope="module")
def prompt():
    return np.random.default_rng(3).integers(0, 700, 40).tolist()


@pytest.fixture(scope="module")
def f32_logits(f32_path, prompt):
    return runtime.load(f32_path, n_ctx=128).logits(prompt)


def test_split_file_loads_from_any_part(f32_path, prompt, f32_logits, tmp_path):
    rewrite(f32_path, tmp_path / "tiny.gguf", split_max_tensors=40)
    parts = sorted(tmp_path.glob("tiny-*-of-*.gguf"))
    assert len(parts) >= 3
    for part in (parts[0], parts[-1]):
        np.testing.assert_array_equal(runtime.load(part, n_ctx=128).logits(prompt), f32_logits)
    parts[1].unlink()
    with pytest.raises(StepstreamError, match="missing"):
        runtime.load(parts[0])


def test_trunk_only_file(f32_path, prompt, f32_logits, tmp_path):
    """llama.cpp can keep the MTP heads in a separate file: the metadata still declares them."""
    trunk = tmp_path / "trunk.gguf"
    n_layers = runtime.load(f32_path).cfg.n_layers
    rewrite(f32_path, trunk, keep_tensor=lambda name: not any(name.startswith(f"blk.{i}.") for i in range(n_layers, n_layers + 3)))
    m = runtime.load(trunk, n_ctx=128)
    assert m.cfg.n_mtp == 3 and m.weights.nextn == []
    np.testing.assert_array_equal(m.logits(prompt), f32_logits)
    with pytest.raises(StepstreamError, match="no MTP heads"):
        m.mtp_logits(prompt)


def _llama_quantize(src, dst, ftype):
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = 2
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    assert rc == 0


def test_llama_cpp_written_file_loads(f32_path, prompt, f32_logits, tmp_path):
    """llama.cpp's quantizer rewrites the metadata its own way; ours must still read it."""
    import llama_cpp

    out = tmp_path / "tiny-llama-q8_0.gguf"
    _llama_quantize(f32_path, out, llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0)
    m = runtime.load(out, n_ctx=128)
    assert m.cfg == runtime.load(f32_path, n_ctx=128).cfg
    got = m.logits(prompt)
    cos = (got * f32_logits).sum(-1) / np.linalg.norm(got, axis=-1) / np.linalg.norm(f32_logits, axis=-1)
    assert cos.min() > 0.95  # Q8_0 of a random miniature; exact checks live in test_runtime_quant


def test_wrong_architecture(f32_path, tmp_path):
    bad = tmp_path / "llama.gguf"
    w = gguf.GGUFWriter(bad, "llama")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(StepstreamError, match=r"architecture is 'llama'.*step35"):
        runtime.load(bad)


def test_truncated_file(f32_path, tmp_path):
    data = f32_path.read_bytes()
    for cut in (len(data) // 2, 100):
        bad = tmp_path / f"cut{cut}.gguf"
        bad.write_bytes(data[:cut])
        with pytest.raises(StepstreamError, match="truncated"):
            runtime.load(bad)


def test_not_a_gguf_and_missing(tmp_path):
    (tmp_path / "x.gguf").write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(StepstreamError, match="not a GGUF"):
        runtime.load(tmp_path / "x.gguf")
    with pytest.raises(StepstreamError, match="not found"):
        runtime.load(tmp_path / "absent.gguf")


def test_missing_and_inconsistent_metadata(f32_path, tmp_path):
    # a key llama.cpp requires too (key_length it defaults: tests/test_metadata_defaults.py)
    rewrite(f32_path, tmp_path / "nokey.gguf", drop={"step35.attention.layer_norm_rms_epsilon"})
    with pytest.raises(StepstreamError, match="layer_norm_rms_epsilon"):
        runtime.load(tmp_path / "nokey.gguf")
    rewrite(f32_path, tmp_path / "heads.gguf", change={"step35.attention.head_count": [2, 4, 4]})
    with pytest.raises(StepstreamError, match="head_count has 3 entries"):
        runtime.load(tmp_path / "heads.gguf")
    rewrite(f32_path, tmp_path / "dense.gguf", change={"step35.leading_dense_block_count": 2})
    with pytest.raises(StepstreamError, match="block 1 is dense"):
        runtime.load(tmp_path / "dense.gguf")
    rewrite(f32_path, tmp_path / "shape.gguf", change={"step35.expert_feed_forward_length": 128})
    with pytest.raises(StepstreamError, match="ffn_gate_exps.*shape"):
        runtime.load(tmp_path / "shape.gguf")


def test_bad_tokens_and_context(f32_path):
    m = runtime.load(f32_path, n_ctx=32)
    with pytest.raises(StepstreamError, match="outside the vocabulary"):
        m.logits([1, 2, m.cfg.vocab])
    with pytest.raises(StepstreamError, match="outside the vocabulary"):
        m.logits([-1])
    with pytest.raises(StepstreamError, match="exceed the context of 32"):
        m.logits(list(range(33)))
    m.logits(list(range(30)))
    with pytest.raises(StepstreamError, match="after 30 cached positions"):
        m.eval([1, 2, 3])
    assert m.n_past == 30  # a refused call leaves the cache as it was
    with pytest.raises(StepstreamError, match="1-D"):
        m.logits([[1, 2]])


def test_bad_options(f32_path):
    with pytest.raises(StepstreamError, match="unknown option"):
        runtime.load(f32_path, n_ctxx=5)
    with pytest.raises(StepstreamError, match="exceeds the model's context"):
        runtime.load(f32_path, n_ctx=10**9)
    with pytest.raises(StepstreamError, match="n_batch"):
        runtime.load(f32_path, n_batch=0)
    # a chunk longer than the cache is the cache's length, as llama.cpp clamps it (it was refused
    # as needing terabytes "for the runtime")
    m = runtime.load(f32_path, n_ctx=64, n_batch=10**9)
    assert m.options.n_batch == 64
    m.close()
