"""Quantized GGUFs: the runtime against a float64 reference built on the very weights the
file holds (dequantized), and its distance from llama.cpp on the same file, reported.

Ours are converted from the tiny checkpoint; llama.cpp's Q4_K_M is made from our f32 file
by llama.cpp's own quantizer (`llama_model_quantize`), so its metadata and tensor mix
are llama.cpp's.
"""

from __future__ import annotations

import ctypes

import numpy as np
import pytest

import reference_model as R
import runtime
from conftest import llama_cpp_logits


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
    ours = runtime.load(path, n_ctx=128).logits(prompt)
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


def test_llama_cpp_q4_k_m(llama_q4_k_m, prompt, record_property):
    import gguf

    types = {t.tensor_type for t in gguf.GGUFReader(llama_q4_k_m).tensors}
    assert gguf.GGMLQuantizationType.Q4_K in types  # really llama.cpp's mix, not a copy
    _check_against_dequantized_reference(llama_q4_k_m, prompt, record_property, "llama_q4_k_m")
