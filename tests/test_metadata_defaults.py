"""Metadata a step35 file may leave out or add, read as llama.cpp reads it (the reviewer's edited
files): a missing sliding-layer RoPE base is llama.cpp's 10000, not freq_base; without
leading_dense_block_count a block is MoE when it has a router; linear/YaRN position scaling,
which llama.cpp applies and stepstream does not, is refused instead of ignored; tensor type ids
gguf-py does not know are named; tensors stepstream does not use are named in a warning."""

from __future__ import annotations

import re

import numpy as np
import pytest
from gguf import GGUFValueType as V

from runtime.base.errors import StepstreamError
from runtime.base.gguf_schema import Key
from runtime.loader import load
from tests.helpers import reference_model as R
from tests.helpers.gguf_edit import rewrite
from tests.helpers.llama import llama_cpp_logits


@pytest.fixture(scope="module")
def f32_path(tiny_gguf):
    return tiny_gguf("f32")


def _logits(path, tokens):
    m = load(path, n_ctx=128)
    try:
        return m.logits(tokens)
    finally:
        m.close()


def _tokens(path, n=40):
    m = load(path, n_ctx=128)
    try:
        return np.random.default_rng(3).integers(0, m.cfg.vocab, n).tolist(), m.cfg
    finally:
        m.close()


def test_a_missing_sliding_rope_base_is_llama_cpps_default(f32_path, tmp_path):
    tokens, cfg = _tokens(f32_path)
    assert cfg.rope_base_full != 10000.0 and any(cfg.sliding)  # else the default could not show
    named = tmp_path / "named.gguf"  # the same base, said in the file
    rewrite(f32_path, named, change={Key.ROPE_BASE_SWA: 10000.0})
    missing = tmp_path / "missing.gguf"
    rewrite(f32_path, missing, drop={Key.ROPE_BASE_SWA})
    ours = _logits(missing, tokens)
    np.testing.assert_array_equal(ours, _logits(named, tokens))
    llama = llama_cpp_logits(missing, tokens, n_ctx=128)
    assert R.cosine_rows(ours, llama).min() >= 0.9999
    assert (ours.argmax(-1) == llama.argmax(-1)).all()


def test_without_leading_dense_block_count_the_routers_say_which_blocks_are_moe(f32_path, tmp_path):
    tokens, cfg = _tokens(f32_path)
    assert not cfg.moe[0] and any(cfg.moe)  # the tiny file leads with a dense block
    missing = tmp_path / "no_leading.gguf"
    rewrite(f32_path, missing, drop={Key.LEADING_DENSE})
    m = load(missing, n_ctx=128)
    try:
        assert m.cfg.moe == cfg.moe
        ours = m.logits(tokens)
    finally:
        m.close()
    np.testing.assert_array_equal(ours, _logits(f32_path, tokens))
    llama = llama_cpp_logits(missing, tokens, n_ctx=128)
    assert R.cosine_rows(ours, llama).min() >= 0.9999


def _equivalent(cfg, case):
    """(the edit llama.cpp runs, the same model said as stepstream's converter says it)."""
    if case == "no key_length":  # llama.cpp: embedding_length / head_count of block 0
        assert cfg.hidden // cfg.n_head[0] == cfg.head_dim
        return {"drop": {Key.KEY_LENGTH, Key.VALUE_LENGTH}}, {}
    if case == "gating none":  # llama.cpp's step35 routes LLAMA_EXPERT_GATING_FUNC_TYPE_NONE with sigmoid
        return {"change": {Key.EXPERT_GATING: 0}}, {}
    if case == "window past context":  # masks nothing a position below the context can reach
        return ({"change": {Key.CONTEXT_LENGTH: 128, Key.SLIDING_WINDOW: 100_000}},
                {"change": {Key.CONTEXT_LENGTH: 128, Key.SLIDING_WINDOW: 128}})
    # llama.cpp clamps only with a limit above 1e-6
    assert any(x > 0 for x in cfg.swiglu_limit)  # else no clamp would show
    off = [0.0 if i % 2 else x for i, x in enumerate(cfg.swiglu_limit)]
    said = [(-4.0 if i % 4 == 1 else 1e-7) if i % 2 else x for i, x in enumerate(cfg.swiglu_limit)]
    assert off != list(cfg.swiglu_limit)
    return {"change": {Key.CLAMP_EXP: said, Key.CLAMP_SHEXP: said}}, {"change": {Key.CLAMP_EXP: off, Key.CLAMP_SHEXP: off}}


@pytest.mark.parametrize("case", ["no key_length", "gating none", "window past context", "clamps at or below 1e-6"])
def test_metadata_llama_cpp_runs_runs_as_it_runs_there(f32_path, tmp_path, case):
    """Files llama.cpp loads that stepstream refused: no attention.key_length, expert_gating_func
    0, a window past the context, negative or tiny SwiGLU limits. Each runs as its equivalent."""
    # (120 positions: the tiny model's window is shorter, so a window capped too low would show)
    tokens, cfg = _tokens(f32_path, 120 if case == "window past context" else 40)
    edit, same = _equivalent(cfg, case)
    edited, named = tmp_path / "edited.gguf", tmp_path / "named.gguf"
    rewrite(f32_path, edited, **edit)
    rewrite(f32_path, named, **same)
    if case == "window past context":
        assert cfg.window < 120
        m = load(edited, n_ctx=128)
        assert m.cfg.window == 128 and m.cache.window == 128  # the rings hold the context, not 100,000
        m.close()
    ours = _logits(edited, tokens)
    np.testing.assert_array_equal(ours, _logits(named, tokens))
    llama = llama_cpp_logits(edited, tokens, n_ctx=128)
    assert R.cosine_rows(ours, llama).min() >= 0.9999
    assert (ours.argmax(-1) == llama.argmax(-1)).all()


def test_clamp_edit_changes_the_logits(f32_path, tmp_path):
    """The clamp case above compares files that differ from the tiny one (else it could not fail)."""
    tokens, cfg = _tokens(f32_path)
    _, same = _equivalent(cfg, "clamps at or below 1e-6")
    rewrite(f32_path, tmp_path / "off.gguf", **same)
    assert not np.array_equal(_logits(tmp_path / "off.gguf", tokens), _logits(f32_path, tokens))


@pytest.mark.parametrize("kind, factor", [("linear", 4.0), ("yarn", 8.0), (None, 2.0)])
def test_position_scaling_llama_cpp_would_apply_is_refused(f32_path, tmp_path, kind, factor):
    path = tmp_path / "scaled.gguf"
    add = {Key.ROPE_SCALING_FACTOR: (factor, V.FLOAT32)}
    if kind is not None:  # only a factor: llama.cpp reads it as linear scaling
        add[Key.ROPE_SCALING_TYPE] = (kind, V.STRING)
    rewrite(f32_path, path, add=add)
    with pytest.raises(StepstreamError, match=rf"rope.scaling.* with {Key.ROPE_SCALING_FACTOR}={factor:g}: "
                                              "stepstream does not implement"):
        load(path, n_ctx=64)


@pytest.mark.parametrize("kind, factor", [("none", 4.0), ("linear", 1.0), ("yarn", 0.0)])
def test_position_scaling_that_changes_nothing_runs(f32_path, tmp_path, kind, factor):
    path = tmp_path / "unscaled.gguf"
    rewrite(f32_path, path, add={Key.ROPE_SCALING_TYPE: (kind, V.STRING), Key.ROPE_SCALING_FACTOR: (factor, V.FLOAT32)})
    tokens, _ = _tokens(f32_path, 8)
    np.testing.assert_array_equal(_logits(path, tokens), _logits(f32_path, tokens))


def test_the_refusal_is_one_line_with_status_2(f32_path, tmp_path):
    import subprocess
    import sys

    path = tmp_path / "scaled.gguf"
    rewrite(f32_path, path, add={Key.ROPE_SCALING_TYPE: ("linear", V.STRING), Key.ROPE_SCALING_FACTOR: (4.0, V.FLOAT32)})
    r = subprocess.run([sys.executable, "-m", "runtime.cli", "run", "-m", str(path), "-p", "x", "-n", "1"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and "does not implement linear, YaRN or LongRoPE" in lines[0], r.stderr


def _patched_type(src, dst, tensor: str, type_id: int):
    """A copy of src whose `tensor` says it holds type `type_id` (its info's type field rewritten)."""
    import struct

    from gguf import GGUFReader

    r = GGUFReader(src)
    t = next(t for t in r.tensors if t.name == tensor)
    buf = bytearray(open(src, "rb").read())
    name = tensor.encode()
    at = buf.index(struct.pack("<Q", len(name)) + name)  # the tensor info: name, n_dims, dims, type
    at += 8 + len(name) + 4 + 8 * len(t.shape)
    assert struct.unpack_from("<I", buf, at)[0] == int(t.tensor_type)
    struct.pack_into("<I", buf, at, type_id)
    open(dst, "wb").write(buf)


@pytest.mark.parametrize("type_id, want", [
    (42, "is Q2_0 (type id 42), a format stepstream cannot run"),
    (31, "is Q4_0_4_4 (type id 31), a layout llama.cpp has removed"),
    (37, "is IQ4_NL_4_8 (type id 37), a layout llama.cpp has removed"),
    (77, "has type id 77, which is no GGML tensor type"),
])
def test_a_type_id_gguf_py_does_not_know_is_named(f32_path, tmp_path, type_id, want):
    path = tmp_path / "typed.gguf"
    _patched_type(f32_path, path, "output_norm.weight", type_id)
    with pytest.raises(StepstreamError, match=re.escape(f"tensor 'output_norm.weight' {want}")):
        load(path, n_ctx=64)


def test_tensors_stepstream_does_not_use_are_named_in_one_warning_line(f32_path, tmp_path):
    """llama.cpp refuses a file with tensors it does not know; stepstream runs it and says which."""
    import subprocess
    import sys

    from gguf import GGUFReader, GGUFWriter

    r = GGUFReader(f32_path)
    norm = next(t for t in r.tensors if t.name == "output_norm.weight")
    w = GGUFWriter(tmp_path / "tmp.gguf", "step35")  # a copy plus one tensor
    for key, field in r.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        sub = field.types[1] if field.types[0] == V.ARRAY else None
        w.add_key_value(key, field.contents(), field.types[0], sub)
    for t in r.tensors:
        w.add_tensor(t.name, np.asarray(t.data), raw_shape=np.asarray(t.data).shape, raw_dtype=t.tensor_type)
    w.add_tensor("blk.0.attn_bias.weight", np.asarray(norm.data).copy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.warns(UserWarning, match=r"1 tensor this stepstream does not use \(blk.0.attn_bias.weight\)"):
        load(tmp_path / "tmp.gguf", n_ctx=64).close()
    out = subprocess.run([sys.executable, "-m", "runtime.cli", "run", "-m", str(tmp_path / "tmp.gguf"), "-p", "x",
                          "-n", "1"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    warned = [l for l in out.stderr.splitlines() if "does not use" in l]
    assert len(warned) == 1 and warned[0].startswith("warning: ") and "UserWarning" not in out.stderr, out.stderr
