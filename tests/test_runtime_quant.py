"""Quantized GGUFs: the runtime against a float64 reference built on the very weights the
file holds (dequantized), and its distance from llama.cpp on the same file, reported.

The weight tests run with float32 activations (``activations="f32"``), which isolates the
weight decoding. The default q8 mode (activations rounded to int8 per 256 columns, as
llama.cpp does) is checked against the same reference with that rounding applied, on the
trained miniature model: the random tiny model is chaotic enough that rounding noise
alone moves llama.cpp's own logits to a cosine of 0.88 from the reference.

Ours are converted from the tiny checkpoint; llama.cpp's Q4_K_M is made from our f32 file
by llama.cpp's own quantizer (`llama_model_quantize`), so its metadata and tensor mix
are llama.cpp's.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import reference_model as R
import runtime
from tests.helpers.llama import llama_cpp_logits


@pytest.fixture(scope="module")
def prompt():
    return np.random.default_rng(11).integers(0, 700, 64).tolist()


@pytest.fixture(scope="module")
def llama_q4_k_m(tiny_gguf, tmp_path_factory):
    import llama_cpp

    out = tmp_path_factory.mktemp("llq") / "tiny-llama-Q4_K_M.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
    params.nthread = 2
    assert llama_cpp.llama_model_quantize(str(tiny_gguf("f32")).encode(), str(out).encode(), ctypes.byref(params)) == 0
    return out


def _check_against_dequantized_reference(path, prompt, record_property, label):
    cfg, W = R.gguf_weights(path)
    ref = R.forward_logits(cfg, W, prompt)
    ours = runtime.load(path, n_ctx=128, activations="f32", cache_type_k="f32",
                        cache_type_v="f32").logits(prompt)  # the float64 reference rounds no keys
    cos = R.cosine_rows(ours, ref)
    assert cos.min() >= 0.9999, (label, cos.min())
    assert (ours.argmax(-1) == ref.argmax(-1)).mean() == 1.0

    llama = llama_cpp_logits(path, prompt, n_ctx=128)
    kl = R.kl_rows(llama, ours)
    record_property(f"{label}_kl_vs_llama_cpp_mean", float(kl.mean()))
    record_property(f"{label}_kl_vs_llama_cpp_max", float(kl.max()))
    record_property(f"{label}_top1_vs_llama_cpp", float((ours.argmax(-1) == llama.argmax(-1)).mean()))
    print(f"{label}: cos vs dequantized reference min {cos.min():.7f}; KL(llama.cpp || ours) mean {kl.mean():.5f} max {kl.max():.5f}; "
          f"top-1 agreement with llama.cpp {(ours.argmax(-1) == llama.argmax(-1)).mean():.3f}")
    # llama.cpp quantizes activations for its quantized dot products; it stays close.
    assert kl.mean() < 0.05


@pytest.mark.parametrize("ftype", ["f16", "bf16", "q8_0", "q4_0", "q4_k_m"])
def test_our_quantized_files(tiny_gguf, prompt, record_property, ftype):
    _check_against_dequantized_reference(tiny_gguf(ftype), prompt, record_property, ftype)


@pytest.mark.slow
def test_llama_cpp_q4_k_m(llama_q4_k_m, prompt, record_property):
    import gguf

    types = {t.tensor_type for t in gguf.GGUFReader(llama_q4_k_m).tensors}
    assert gguf.GGMLQuantizationType.Q4_K in types  # really llama.cpp's mix, not a copy
    _check_against_dequantized_reference(llama_q4_k_m, prompt, record_property, "llama_q4_k_m")


def test_q8_activations_against_rounded_reference(record_property):
    """The default q8 mode on the shipped trained model: equal to the float64 reference with
    the same activation rounding, and at least as close as llama.cpp to the exact reference."""
    path = Path(runtime.__file__).parent / "data" / "step35-mini-q4_k_m.gguf"
    m = runtime.load(path, n_ctx=256, cache_type_k="f32", cache_type_v="f32")  # the reference keeps float32 keys
    assert m.options.activations == "q8"
    prompt = m.tokenize("def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1)"
                        " + fibonacci(n - 2)\n\nThe quick brown fox jumps over the lazy dog.")
    ours = m.logits(prompt)
    cfg, W = R.gguf_weights(path, q8_activations=True)
    rounded = R.forward_logits(cfg, W, prompt)
    cos = R.cosine_rows(ours, rounded)
    assert cos.min() >= 0.9999, cos.min()
    # the same top token wherever the reference's choice is clear: a margin under 0.05 between
    # its two best logits is within what one int8 rounding landing the other way can move
    top2 = np.sort(rounded, axis=-1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] >= 0.05
    assert clear.mean() >= 0.9, clear.mean()
    assert (ours.argmax(-1) == rounded.argmax(-1))[clear].all()

    cfg, W = R.gguf_weights(path)
    exact = R.forward_logits(cfg, W, prompt)
    llama = llama_cpp_logits(path, prompt, n_ctx=256)
    kl_ours, kl_llama = R.kl_rows(exact, ours).mean(), R.kl_rows(exact, llama).mean()
    record_property("q8_kl_vs_exact_mean", float(kl_ours))
    record_property("llama_cpp_kl_vs_exact_mean", float(kl_llama))
    print(f"q8 activations: cos vs rounded reference min {cos.min():.7f}; KL(exact || ours) {kl_ours:.5f}, "
          f"KL(exact || llama.cpp) {kl_llama:.5f}")
    assert kl_ours <= kl_llama
