"""FP8 checkpoints (stepfun-ai/Step-3.5-Flash-FP8's format) convert to the weights they stand for.

The FP8 checkpoints here are made from the tiny bf16 one with torch, as FP8 checkpoints are made:
each 128 x 128 block (or each matrix) divided by its absolute maximum over 448, cast to
torch.float8_e4m3fn, the divisor kept as `weight_scale_inv`. The reference for what the converter
must read back is torch too: `codes.float() * scale`, the scale repeated over its block and cut to
the matrix (llama.cpp's converter and transformers compute it so). The tiny model's embedding has
704 rows, so its last 128-row block is partial; a [96, 80] block leaves partial blocks in both
directions, and small chunks cut blocks in the middle.
"""

from __future__ import annotations

import json
import math
import shutil

import gguf
import numpy as np
import pytest

from convert import layout, tensor_stream
from convert.converter import convert
from convert.hf_config import HFConfig
from convert.safetensors_io import Checkpoint, SafetensorsWriter
from quant import fp8
from runtime.base.errors import StepstreamError
from runtime.cli import main
from tests.helpers.cli_output import error_line

torch = pytest.importorskip("torch")

KEPT_BF16 = (layout.NORM, layout.ROUTER, layout.ROUTER_BIAS)  # as FP8 checkpoints leave them


def to_fp8(w: np.ndarray, block: tuple[int, int] | None, dtype=None):
    """(codes uint8, scales float32, reference float32) of weights [..., R, C]."""
    dtype = dtype or torch.float8_e4m3fn
    t = torch.from_numpy(np.ascontiguousarray(w, np.float32))
    *lead, rows, cols = t.shape
    b0, b1 = block or (rows, cols)
    sr, sc = -(-rows // b0), -(-cols // b1)
    padded = torch.zeros(*lead, sr * b0, sc * b1)
    padded[..., :rows, :cols] = t
    amax = padded.reshape(*lead, sr, b0, sc, b1).abs().amax(dim=(-3, -1))
    scale = torch.where(amax > 0, amax / torch.finfo(dtype).max, torch.ones_like(amax))
    full = scale.repeat_interleave(b0, -2).repeat_interleave(b1, -1)[..., :rows, :cols]
    q = (t / full).to(dtype)
    reference = q.float() * full
    if block is None:
        scale = scale.reshape(lead or [1])
    return q.view(torch.uint8).numpy(), scale.numpy(), reference.numpy()


def make_fp8(src, dst, block=(128, 128), quant_config=None, edit=None):
    """An FP8 copy of checkpoint `src` in `dst`, one shard; returns {hf name: reference float32}.
    `edit(tensors)` may change {name: (dtype, array)} before it is written."""
    dst.mkdir()
    for p in src.iterdir():
        if p.suffix != ".safetensors" and p.name != "model.safetensors.index.json":
            shutil.copy(p, dst / p.name)
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = quant_config or {
        "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
        **({"weight_block_size": list(block)} if block else {})}
    (dst / "config.json").write_text(json.dumps(config))
    ckpt = Checkpoint(src)
    tensors, reference = {}, {}
    for spec in layout.checkpoint_layout(HFConfig.load(src)):
        w = ckpt.read(spec.hf_name)
        entry = ckpt.entry(spec.hf_name)
        if spec.role in KEPT_BF16 or len(spec.shape) < 2:
            tensors[spec.hf_name] = (entry.dtype, w)
            continue
        codes, scales, reference[spec.hf_name] = to_fp8(w, block)
        tensors[spec.hf_name] = ("F8_E4M3", codes)
        tensors[spec.hf_name + "_scale_inv"] = ("F32", scales)
    if edit:
        edit(tensors)
    writer = SafetensorsWriter(dst / "model.safetensors")
    for name, (dtype, a) in tensors.items():
        writer.add(name, dtype, a.shape)
    for name, (dtype, a) in tensors.items():
        writer.write(name, a if a.ndim else a.reshape(()))
    writer.close()
    return reference


def gguf_tensors(path):
    return {t.name: np.asarray(t.data) for t in gguf.GGUFReader(path).tensors}


def hf_to_gguf(ckpt):
    return {s.hf_name: s.gguf_name for s in layout.checkpoint_layout(HFConfig.load(ckpt))}


def test_decode_tables_are_torch_float8_values():
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    for dtype, torch_dtype in (("F8_E4M3", torch.float8_e4m3fn), ("F8_E5M2", torch.float8_e5m2)):
        want = codes.view(torch_dtype).float().numpy()
        np.testing.assert_array_equal(fp8.table(dtype), want)  # NaN where torch has NaN, -0.0 included
        assert np.array_equal(np.signbit(fp8.table(dtype)), np.signbit(want))


@pytest.mark.parametrize("block", [(128, 128), (96, 80), None], ids=["128x128", "96x80", "per-matrix"])
def test_an_fp8_checkpoint_converts_to_its_dequantized_weights(tiny_ckpt, tiny_gguf, tmp_path, monkeypatch, block):
    """Every FP8 weight in the f32 GGUF is torch's `codes.float() * scale` to the bit; the bf16
    tensors it kept are the bf16 checkpoint's. Chunks of 10,240 weights (40 rows of 256, 20 of
    512) start inside blocks and end in the next ones."""
    ref = make_fp8(tiny_ckpt, tmp_path / "fp8", block)
    monkeypatch.setattr(tensor_stream, "CHUNK_WEIGHTS", 40 * 256)
    s = convert(tmp_path / "fp8", tmp_path / "out.gguf", "f32", progress=False, threads=1)
    got = gguf_tensors(tmp_path / "out.gguf")
    plain = gguf_tensors(tiny_gguf("f32"))
    names = hf_to_gguf(tiny_ckpt)
    assert len(ref) > 40 and got.keys() == plain.keys()
    for hf, g in names.items():
        if hf in ref:
            np.testing.assert_array_equal(got[g].reshape(ref[hf].shape), ref[hf], err_msg=hf)
        else:
            np.testing.assert_array_equal(got[g], plain[g], err_msg=hf)
    # the ETA counts weights, not bytes: an FP8 checkpoint's are about half a bf16 one's
    assert s.in_weights == sum(math.prod(sp.shape) for sp in layout.checkpoint_layout(HFConfig.load(tiny_ckpt)))
    assert s.in_bytes < 0.6 * sum(Checkpoint(tiny_ckpt).entry(n).nbytes for n in Checkpoint(tiny_ckpt).names())


def test_q4_k_m_from_fp8_is_q4_k_m_of_the_dequantized_weights(tiny_ckpt, tmp_path):
    """The quantized file is byte for byte the one made from an F32 checkpoint of the reference values."""
    ref = make_fp8(tiny_ckpt, tmp_path / "fp8")
    src = Checkpoint(tiny_ckpt)
    f32 = tmp_path / "f32"
    f32.mkdir()
    for p in (tmp_path / "fp8").iterdir():
        if p.suffix != ".safetensors":
            shutil.copy(p, f32 / p.name)
    config = json.loads((f32 / "config.json").read_text())
    del config["quantization_config"]
    (f32 / "config.json").write_text(json.dumps(config))
    w = SafetensorsWriter(f32 / "model.safetensors")
    specs = layout.checkpoint_layout(HFConfig.load(tiny_ckpt))
    for sp in specs:
        w.add(sp.hf_name, "F32" if sp.hf_name in ref else src.entry(sp.hf_name).dtype, sp.shape)
    for sp in specs:
        w.write(sp.hf_name, ref[sp.hf_name] if sp.hf_name in ref else src.read(sp.hf_name))
    w.close()
    convert(tmp_path / "fp8", tmp_path / "a.gguf", "q4_k_m", progress=False, threads=1)
    convert(f32, tmp_path / "b.gguf", "q4_k_m", progress=False, threads=1)
    a, b = gguf_tensors(tmp_path / "a.gguf"), gguf_tensors(tmp_path / "b.gguf")
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


Q = "model.layers.1.self_attn.q_proj.weight"
EXPERTS = "model.layers.1.moe.gate_proj.weight"


def _refused(tmp_path, capsys, **kw) -> str:
    make_fp8(kw.pop("src"), tmp_path / "fp8", **kw)
    rc = main(["convert", str(tmp_path / "fp8"), str(tmp_path / "out.gguf"), "--type", "f32", "--threads", "1",
               "--no-progress"])
    line = error_line(capsys)
    assert rc == 2, line
    assert not (tmp_path / "out.gguf").exists()
    return line


def test_a_weight_without_its_scales_is_refused(tiny_ckpt, tmp_path, capsys):
    line = _refused(tmp_path, capsys, src=tiny_ckpt, edit=lambda t: t.pop(Q + "_scale_inv"))
    assert line.endswith(f"tensor {Q!r} is F8_E4M3 without its scales {Q + '_scale_inv'!r}")


def test_scales_of_the_wrong_shape_are_refused(tiny_ckpt, tmp_path, capsys):
    def edit(t):
        dtype, a = t[EXPERTS + "_scale_inv"]
        t[EXPERTS + "_scale_inv"] = (dtype, a[:, :1])
    line = _refused(tmp_path, capsys, src=tiny_ckpt, edit=edit)
    assert line.endswith(f"tensor {EXPERTS + '_scale_inv'!r} has shape [16, 1, 2]; expected [16, 2, 2] "
                         "(weight_block_size [128, 128] over [16, 256, 256])")


def test_fp8_weights_without_a_quantization_config_are_refused(tiny_ckpt, tmp_path, capsys):
    make_fp8(tiny_ckpt, tmp_path / "fp8")
    config = json.loads((tmp_path / "fp8" / "config.json").read_text())
    del config["quantization_config"]
    (tmp_path / "fp8" / "config.json").write_text(json.dumps(config))
    with pytest.raises(StepstreamError, match="is F8_E4M3, but config.json has no quantization_config"):
        convert(tmp_path / "fp8", tmp_path / "out.gguf", "f32", progress=False)


@pytest.mark.parametrize("config, message", [
    ({"quant_method": "gptq", "bits": 4}, "quantization_config.quant_method is \"gptq\": stepstream converts"),
    ({"quant_method": "fp8", "weight_block_size": [128]}, "weight_block_size must be [rows, columns], got [128]"),
    ({"quant_method": "fp8", "weight_block_size": [128, 0]},
     "quantization_config.weight_block_size[1] must be a positive integer, got 0"),
    ({"quant_method": 8}, "quantization_config.quant_method must be a string, got 8"),
])
def test_a_quantization_config_it_cannot_read_is_refused(tiny_ckpt, tmp_path, capsys, config, message):
    line = _refused(tmp_path, capsys, src=tiny_ckpt, quant_config=config)
    assert message in line and "config.json" in line


def test_nan_codes_are_named(tiny_ckpt, tmp_path):
    def nan_code(t):
        t[Q][1][3, 5] = 0x7F  # E4M3's NaN
    make_fp8(tiny_ckpt, tmp_path / "a", edit=nan_code)
    with pytest.raises(StepstreamError, match=f"tensor {Q!r} holds NaN or Inf \\(first at flat index {3 * 256 + 5}\\)"):
        convert(tmp_path / "a", tmp_path / "a.gguf", "f32", progress=False)


@pytest.mark.parametrize("value, why", [(np.nan, "is NaN or Inf"), (-0.5, "is negative"),
                                        (3e38, "times the largest F8_E4M3 value overflows float32")])
def test_bad_scales_are_refused_before_any_weight_is_read(tiny_ckpt, tmp_path, capsys, value, why):
    """A NaN scale was found only when its tensor's chunk was read (for the real model, possibly an
    hour in); a negative one flipped the weights' signs without a word, and one whose product
    overflowed was blamed on the weight. All three are refused by the plan, naming the scale."""
    def edit(t):
        t[EXPERTS + "_scale_inv"][1][3, 1, 0] = value
    line = _refused(tmp_path, capsys, src=tiny_ckpt, edit=edit)
    assert line.endswith(f"tensor {EXPERTS + '_scale_inv'!r} holds scale {value:g} at flat index 14, which {why}")


def test_zero_scales_are_read_as_zero_weights(tiny_ckpt, tmp_path):
    """An all-zero block may be stored with scale 0 by a quantizer that does not guard it."""
    def edit(t):
        t[Q + "_scale_inv"][1][1, 0] = 0.0
    ref = make_fp8(tiny_ckpt, tmp_path / "fp8", edit=edit)
    convert(tmp_path / "fp8", tmp_path / "out.gguf", "f32", progress=False, threads=1)
    got = gguf_tensors(tmp_path / "out.gguf")[hf_to_gguf(tiny_ckpt)[Q]].reshape(ref[Q].shape)
    assert not got[128:256, :128].any() and got[:128].any()
    np.testing.assert_array_equal(got[:128], ref[Q][:128])


def test_a_changed_quantization_config_is_not_resumed(tiny_ckpt):
    """The resume key holds quantization_config: a block size edited between runs could give the
    same scale grids and header, and --resume mixed the two settings' tensors in one file."""
    from convert import fp8_source, resume

    cfg = HFConfig.load(tiny_ckpt)
    a = dict(cfg.raw, quantization_config={"quant_method": "fp8", "weight_block_size": [128, 128]})
    b = dict(cfg.raw, quantization_config={"quant_method": "fp8", "weight_block_size": [136, 136]})
    keys = {resume.conversion_key(b"h", Checkpoint(tiny_ckpt), fp8_source.identity(HFConfig.from_dict(r)))
            for r in (a, b, cfg.raw)}
    assert len(keys) == 3


def test_per_matrix_scales_may_be_named_as_vllm_names_them(tiny_ckpt, tmp_path):
    """Without weight_block_size, vLLM's FP8 checkpoints call the one scale X.weight_scale."""
    def rename(t):
        for name in [n for n in t if n.endswith("_scale_inv")]:
            t[name[:-len("_inv")]] = t.pop(name)
    ref = make_fp8(tiny_ckpt, tmp_path / "fp8", block=None, edit=rename)
    convert(tmp_path / "fp8", tmp_path / "out.gguf", "f32", progress=False, threads=1)
    got = gguf_tensors(tmp_path / "out.gguf")
    for hf, g in hf_to_gguf(tiny_ckpt).items():
        if hf in ref:
            np.testing.assert_array_equal(got[g].reshape(ref[hf].shape), ref[hf], err_msg=hf)


def test_block_scales_must_be_named_scale_inv(tiny_ckpt, tmp_path, capsys):
    def rename(t):
        t[Q + "_scale"] = t.pop(Q + "_scale_inv")
    line = _refused(tmp_path, capsys, src=tiny_ckpt, edit=rename)
    assert line.endswith(f"tensor {Q!r} is F8_E4M3 without its scales {Q + '_scale_inv'!r}")


def test_scales_of_a_skipped_weight_are_skipped(tiny_ckpt, tmp_path):
    """A tied checkpoint's FP8 lm_head is skipped; its scales were refused as outside the layout."""
    def tie(t):
        codes, scales, _ = to_fp8(np.ones((704, 256), np.float32), (128, 128))
        t["lm_head.weight"] = ("F8_E4M3", codes)
        t["lm_head.weight_scale_inv"] = ("F32", scales)
    make_fp8(tiny_ckpt, tmp_path / "fp8", edit=tie)
    config = json.loads((tmp_path / "fp8" / "config.json").read_text())
    (tmp_path / "fp8" / "config.json").write_text(json.dumps(dict(config, tie_word_embeddings=True)))
    s = convert(tmp_path / "fp8", tmp_path / "out.gguf", "f32", progress=False, threads=1)
    assert "tie_word_embeddings" in s.skipped["lm_head.weight"]
    assert s.skipped["lm_head.weight_scale_inv"].startswith("the scales of 'lm_head.weight', which is not converted")


def test_activation_scales_are_skipped_with_their_reason(tiny_ckpt, tmp_path, capsys):
    """A checkpoint quantized with static activation scales also holds `*.input_scale`: accounted
    for as skipped, and the weights are the same; one of no weight in the layout is refused."""
    ref = make_fp8(tiny_ckpt, tmp_path / "fp8", edit=lambda t: t.update({Q[:-len("weight")] + "input_scale":
                                                                          ("F32", np.ones(1, np.float32))}))
    s = convert(tmp_path / "fp8", tmp_path / "out.gguf", "f32", progress=False, threads=1)
    (name, why), = [(n, w) for n, w in s.skipped.items() if "input_scale" in n]
    assert name == "model.layers.1.self_attn.q_proj.input_scale" and why.startswith("an FP8 activation scale")
    got = gguf_tensors(tmp_path / "out.gguf")[hf_to_gguf(tiny_ckpt)[Q]]
    np.testing.assert_array_equal(got.reshape(ref[Q].shape), ref[Q])
    stray = "model.layers.1.nonexistent.input_scale"
    (tmp_path / "b").mkdir()
    line = _refused(tmp_path / "b", capsys, src=tiny_ckpt, edit=lambda t: t.update({stray: ("F32", np.ones(1, np.float32))}))
    assert line.endswith(f"tensor {stray!r} is not part of the Step-3.5 layout implied by config.json")
