"""The GGUF types llama.cpp writes: Q4_1, Q5_0, Q5_1, IQ4_NL, Q2_K, Q3_K, TQ1_0, TQ2_0 and the
code-book types IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S, IQ1_S, IQ1_M.

- Decoding: bit for bit gguf-py's ``gguf.quants.dequantize`` and llama.cpp's own
  ``dequantize_row_*`` (ctypes into the libggml-base of llama-cpp-python), on random codes
  with finite scales and on blocks made by llama.cpp's quantizer.
- Kernels: the float32 GEMV and GEMM against a float64 product of the dequantized weights,
  on odd shapes (a few blocks; rows of 32-weight formats that are not a multiple of 256).
- Files: each llama.cpp preset that writes these types, made by llama.cpp's own quantizer
  (``llama_model_quantize`` with its default parameters) from a miniature step35 whose
  FFN widths (160, 96, 352) are not multiples of 256, so llama.cpp's per-tensor fallbacks
  (Q5_0, Q5_1, Q4_0, IQ4_NL) appear too. Each file loads with ``runtime.load``; its logits
  equal a float64 reference on the file's own weights (dequantized by gguf-py) and track
  llama.cpp's on the same file.
- The imatrix-only types (IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ1_S, IQ1_M): llama.cpp's presets
  refuse to write them without an importance matrix, and llama-cpp-python's
  ``llama_model_quantize`` cannot be given one (its ``imatrix`` parameter is a C++ map).
  Their files are therefore written here with gguf-py, each weight quantized by llama.cpp's
  ``ggml_quantize_chunk`` with an importance matrix (the blocks are llama.cpp's), rows that
  are not a multiple of 256 falling back to IQ4_NL as llama.cpp does; they are checked like
  the presets' files.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

import runtime
from quant import FORMATS, dequantize, pack, quantize, row_bytes
from quant.float_kernels import TILE_ROWS, matmul, matvec
from tests.helpers import reference_model as R
from tests.helpers.llama import llama_cpp_logits
from tests.helpers.quant_llama import finite_blocks, ggml_dequantize, ggml_quantize_imatrix

SMALL = [T.Q4_1, T.Q5_0, T.Q5_1, T.IQ4_NL]                      # 32-weight blocks
SUPER = [T.Q2_K, T.Q3_K, T.TQ1_0, T.TQ2_0]                       # 256-weight super-blocks
GRID = [T.IQ2_XXS, T.IQ2_XS, T.IQ2_S, T.IQ3_XXS, T.IQ3_S, T.IQ1_S, T.IQ1_M]
NEW = SMALL + SUPER + GRID
NEEDS_IMATRIX = [T.IQ2_XXS, T.IQ2_XS, T.IQ2_S, T.IQ1_S, T.IQ1_M]   # ggml_quantize_requires_imatrix
PRESETS = ["Q4_K_M", "Q4_K_S", "Q5_K_M", "Q5_K_S", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q2_K", "Q4_1", "Q5_0",
           "Q5_1", "IQ4_NL", "IQ4_XS", "IQ3_S", "IQ3_M", "TQ1_0", "TQ2_0"]
IMATRIX_FILES = [T.IQ2_XXS, T.IQ2_XS, T.IQ2_S, T.IQ3_XXS, T.IQ1_S, T.IQ1_M]


def bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, np.float32).view(np.uint32)


def block_cols(qtype, n_blocks: int) -> int:
    return n_blocks * FORMATS[qtype].block_size


# ---------------------------------------------------------------- decoding

@pytest.mark.parametrize("qtype", NEW, ids=lambda t: t.name)
def test_decode_random_blocks_bit_exact_with_gguf_and_llama_cpp(qtype):
    rng = np.random.default_rng(int(qtype))
    rows, cols = 5, block_cols(qtype, 3)
    raw = finite_blocks(rng, qtype, rows, cols)
    got = dequantize(raw, qtype, (rows, cols))
    assert np.isfinite(got).all() and np.abs(got).max() > 0
    np.testing.assert_array_equal(bits(got), bits(gguf.quants.dequantize(raw, qtype)))
    np.testing.assert_array_equal(bits(got), bits(ggml_dequantize(raw, qtype, rows, cols)))


@pytest.mark.parametrize("qtype", NEW, ids=lambda t: t.name)
def test_decode_llama_cpp_quantized_blocks(qtype):
    """Blocks from llama.cpp's quantizer (with an importance matrix for the IQ types that need
    one) decode as llama.cpp decodes them, and close to the weights they came from."""
    rng = np.random.default_rng(3)
    x = (0.02 * rng.standard_t(5, (4, 512))).astype(np.float32)
    raw = ggml_quantize_imatrix(x, qtype, rng.uniform(0.5, 2.0, 512).astype(np.float32))
    got = dequantize(raw, qtype, x.shape)
    np.testing.assert_array_equal(bits(got), bits(ggml_dequantize(raw, qtype, *x.shape)))
    np.testing.assert_array_equal(bits(got), bits(gguf.quants.dequantize(raw, qtype)))
    rel = np.sqrt(np.mean((got - x) ** 2) / np.mean(x ** 2))
    assert rel < {T.IQ1_S: 0.75, T.IQ1_M: 0.7, T.TQ1_0: 0.9, T.TQ2_0: 0.9}.get(qtype, 0.5), rel


@pytest.mark.parametrize("qtype", [T.Q4_1, T.Q5_0, T.Q5_1, T.TQ1_0, T.TQ2_0], ids=lambda t: t.name)
def test_quantize_matches_gguf_on_odd_shapes(qtype):
    x = (0.05 * np.random.default_rng(1).standard_normal((7, block_cols(qtype, 3)))).astype(np.float32)
    want = np.asarray(gguf.quants.quantize(x, qtype)).view(np.uint8).reshape(7, -1)
    np.testing.assert_array_equal(quantize(x, qtype), want)


@pytest.mark.parametrize("qtype", [T.IQ4_NL, *GRID], ids=lambda t: t.name)
def test_read_only_formats_say_so(qtype):
    with pytest.raises(ValueError, match=f"no quantizer for {qtype.name}: stepstream reads"):
        quantize(np.zeros((1, 256), np.float32), qtype)


@pytest.mark.parametrize("qtype", [T.Q2_K, T.Q3_K], ids=lambda t: t.name)
def test_q2_k_and_q3_k_are_written_as_llama_cpp_reads_them(qtype):
    """quant.quantize writes Q2_K and Q3_K (quant.kquant_q2q3); llama.cpp's decoder reads the
    blocks as ours does, within the format's error of the weights."""
    x = (0.02 * np.random.default_rng(5).standard_t(5, (3, 512))).astype(np.float32)
    raw = quantize(x, qtype)
    got = dequantize(raw, qtype, x.shape)
    np.testing.assert_array_equal(bits(got), bits(ggml_dequantize(raw, qtype, *x.shape)))
    assert np.sqrt(np.mean((got - x) ** 2)) < 0.6 * x.std()


# ---------------------------------------------------------------- kernels

def _assert_close(got, W, X):
    W64, X64 = W.astype(np.float64), X.astype(np.float64)
    err = np.abs(got.astype(np.float64) - X64 @ W64.T)
    scale = np.abs(X64) @ np.abs(W64).T
    assert np.all(err <= 2e-6 * scale + 1e-30), float((err / (scale + 1e-30)).max())


@pytest.mark.parametrize("qtype", NEW, ids=lambda t: t.name)
def test_kernels_on_odd_shapes_match_float64(qtype):
    rng = np.random.default_rng(int(qtype) + 100)
    shapes = [(1, block_cols(qtype, 1)), (5, block_cols(qtype, 3)), (TILE_ROWS + 1, block_cols(qtype, 5))]
    if qtype in SMALL:  # the fallback case: rows that are not a multiple of 256, across GEMM tiles
        shapes.append((7, 1312))
    for rows, cols in shapes:
        raw = finite_blocks(rng, qtype, rows, cols)
        W = dequantize(raw, qtype, (rows, cols))
        w = pack(qtype, raw, rows, cols)
        x = rng.standard_normal(cols).astype(np.float32)
        _assert_close(matvec(w, x, np.full(rows, np.nan, np.float32))[None], W, x[None])
        for n in (1, 3, 6):
            X = rng.standard_normal((n, cols)).astype(np.float32)
            _assert_close(matmul(w, X, np.full((n, rows), np.nan, np.float32)), W, X)


# ---------------------------------------------------------------- whole files

@pytest.fixture(scope="module")
def odd_f32(tmp_path_factory) -> Path:
    """A miniature step35 (random weights) whose FFN widths are not multiples of 256, as f32."""
    import convert.mini as mini
    from convert.converter import convert

    base = tmp_path_factory.mktemp("odd")
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(mini.PRESETS, "odd", mini.Preset(256, 4, 128, 2, 4, 1, 16, 4, 160, 96, 352, 700, 16, 1,
                                                     "FFN widths 160, 96, 352: llama.cpp's fallbacks"))
        ckpt = mini.write_mini(base / "ckpt", "odd", seed=0)
    out = base / "odd-f32.gguf"
    convert(ckpt, out, "f32", progress=False)
    return out


@pytest.fixture(scope="module")
def odd_files(odd_f32, tmp_path_factory):
    """files(name) -> the odd miniature quantized by llama.cpp with preset `name` (a preset
    name) or to a code-book type (a GGMLQuantizationType), made once each."""
    out_dir = tmp_path_factory.mktemp("odd_q")
    made: dict = {}

    def files(name):
        if name not in made:
            if isinstance(name, T):
                made[name] = _imatrix_file(odd_f32, out_dir / f"odd-{name.name}.gguf", name)
            else:
                made[name] = _llama_preset(odd_f32, out_dir / f"odd-{name}.gguf", name)
        return made[name]

    return files


def _llama_preset(src: Path, dst: Path, preset: str) -> Path:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{preset}")
    params.nthread = 2
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) == 0
    return dst


def _imatrix_file(src: Path, dst: Path, qtype: T) -> Path:
    """src with every weight matrix but the embeddings, the output and the routers quantized to
    qtype by llama.cpp's ggml_quantize_chunk with an importance matrix; rows that are not a
    multiple of 256 become IQ4_NL (llama.cpp's fallback for the IQ types)."""
    r = gguf.GGUFReader(src)
    w = gguf.GGUFWriter(dst, r.fields["general.architecture"].contents())
    for key, field in r.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        sub = field.types[1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(key, field.contents(), field.types[0], sub)
    rng = np.random.default_rng(0)
    for t in r.tensors:
        data = np.asarray(t.data)
        keep = data.ndim < 2 or t.name in ("token_embd.weight", "output.weight") or "ffn_gate_inp" in t.name \
            or t.tensor_type != T.F32
        if keep:
            w.add_tensor(t.name, data, raw_shape=data.shape, raw_dtype=t.tensor_type)
            continue
        cols = data.shape[-1]
        q = qtype if cols % 256 == 0 else T.IQ4_NL
        imatrix = rng.uniform(0.5, 2.0, cols).astype(np.float32)
        raw = ggml_quantize_imatrix(data.reshape(-1, cols), q, imatrix)
        raw = raw.reshape(*data.shape[:-1], row_bytes(q, cols))
        w.add_tensor(t.name, raw, raw_shape=raw.shape, raw_dtype=q)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


@pytest.fixture(scope="module")
def prompt():
    return np.random.default_rng(11).integers(0, 700, 48).tolist()


def _check_file(path: Path, prompt, record_property, label: str, expect) -> None:
    types = {T(t.tensor_type) for t in gguf.GGUFReader(path).tensors}
    assert expect <= types, (label, sorted(t.name for t in types))
    ours = runtime.load(path, n_ctx=64, activations="f32", cache_type_k="f32",
                        cache_type_v="f32").logits(prompt)  # the float64 reference rounds no keys
    cfg, W = R.gguf_weights(path)
    ref = R.forward_logits(cfg, W, prompt)
    cos = R.cosine_rows(ours, ref)
    assert cos.min() >= 0.9999, (label, cos.min())
    assert (ours.argmax(-1) == ref.argmax(-1)).mean() == 1.0

    llama = llama_cpp_logits(path, prompt, n_ctx=64)
    kl = R.kl_rows(llama, ours)
    top1 = float((ours.argmax(-1) == llama.argmax(-1)).mean())
    record_property(f"{label}_kl_vs_llama_cpp_mean", float(kl.mean()))
    record_property(f"{label}_cos_vs_llama_cpp_min", float(R.cosine_rows(ours, llama).min()))
    print(f"{label}: {', '.join(sorted(t.name for t in types))}; cos vs dequantized reference min {cos.min():.7f}; "
          f"KL(llama.cpp || ours) mean {kl.mean():.5f} max {kl.max():.5f}; "
          f"cos vs llama.cpp min {R.cosine_rows(ours, llama).min():.4f}; top-1 agreement {top1:.3f}")
    # llama.cpp rounds the activations of its quantized dot products (to 8 bits); on this
    # random miniature that moves its logits a little, and no further
    assert kl.mean() < 0.02, (label, kl.mean())


@pytest.mark.slow
@pytest.mark.parametrize("preset", PRESETS)
def test_llama_cpp_preset_loads_and_tracks_llama_cpp(odd_files, prompt, record_property, preset):
    expect = {"Q4_K_M": {T.Q5_0}, "Q4_K_S": {T.Q5_0}, "Q5_K_M": {T.Q5_1}, "Q5_K_S": {T.Q5_1},
              "Q3_K_S": {T.Q3_K}, "Q3_K_M": {T.Q3_K, T.Q5_0}, "Q3_K_L": {T.Q3_K, T.Q5_1}, "Q2_K": {T.Q2_K, T.Q3_K},
              "Q4_1": {T.Q4_1}, "Q5_0": {T.Q5_0}, "Q5_1": {T.Q5_1}, "IQ4_NL": {T.IQ4_NL},
              "IQ4_XS": {T.IQ4_XS, T.IQ4_NL}, "IQ3_S": {T.IQ3_S, T.IQ4_NL}, "IQ3_M": {T.IQ3_S, T.IQ4_NL},
              "TQ1_0": {T.TQ1_0}, "TQ2_0": {T.TQ2_0}}[preset]
    _check_file(odd_files(preset), prompt, record_property, preset, expect)


@pytest.mark.slow
@pytest.mark.parametrize("qtype", IMATRIX_FILES, ids=lambda t: t.name)
def test_imatrix_type_file_loads_and_tracks_llama_cpp(odd_files, prompt, record_property, qtype):
    _check_file(odd_files(qtype), prompt, record_property, qtype.name, {qtype, T.IQ4_NL})


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["Q2_K", "IQ3_S"])
def test_trained_miniature_requantized_by_llama_cpp_agrees_with_it(tmp_path, preset):
    """On the shipped trained miniature (not chaotic like the random one), requantized by
    llama.cpp to a 2- or 3-bit preset, our logits and llama.cpp's pick the same next token."""
    import llama_cpp

    src = Path(runtime.__file__).parent / "data" / "step35-mini-q4_k_m.gguf"
    path = tmp_path / f"mini-{preset}.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{preset}")
    params.nthread = 2
    params.allow_requantize = True
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(path).encode(), ctypes.byref(params)) == 0
    m = runtime.load(path, n_ctx=128, activations="f32")
    tokens = m.tokenize("def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1)"
                        " + fibonacci(n - 2)\n\nclass Point:\n    def __init__(self, x, y):\n")
    ours = m.logits(tokens)
    llama = llama_cpp_logits(path, tokens, n_ctx=128)
    kl = R.kl_rows(llama, ours)
    top1 = float((ours.argmax(-1) == llama.argmax(-1)).mean())
    print(f"trained miniature {preset}: KL(llama.cpp || ours) mean {kl.mean():.5f} max {kl.max():.5f}; top-1 {top1:.3f}")
    assert kl.mean() < 0.01 and top1 >= 0.95, (kl.mean(), top1)
