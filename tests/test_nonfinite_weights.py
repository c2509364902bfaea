"""A file whose weights hold Inf is refused on the default int8-activation path too, as on the
float path: at the first evaluation, in one line, the evaluation rolled back.

On the int8 path an activation of Inf or NaN used to vanish: rounded to int8 it became 0, and
the SwiGLU clamps turned Inf into the clamp and NaN into either bound, so a damaged weight went
on as finite, wrong logits (a user review: exit 0 and different text). Now a 256-column block
holding one gets a NaN scale, and the SwiGLU of one is NaN.

References: numpy's float64 arithmetic for the finite values, the shipped model's own logits."""

from __future__ import annotations

import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest

import runtime
from quant import int8_kernels as q8
from quant.int8_kernels.ffn import swiglu_row
from runtime.base.errors import StepstreamError
from tests.helpers.quant_llama import F16_FIELDS

MODEL = Path(runtime.__file__).parent / "data" / "step35-mini-q4_k_m.gguf"


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
def test_a_block_holding_inf_or_nan_gets_a_nan_scale(bad):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 768)).astype(np.float32)
    clean = q8.quantize_activations(x)
    x[1, 300] = bad  # block 1 of token 1
    a = q8.quantize_activations(x)
    assert np.isnan(a.d[1, 1])
    keep = np.ones_like(a.d, bool)
    keep[1, 1] = False
    np.testing.assert_array_equal(a.d[keep], clean.d[keep])  # every other block's bits as before
    np.testing.assert_array_equal(a.q[0], clean.q[0])


@pytest.mark.parametrize("lim", [0.0, 6.0])
@pytest.mark.parametrize("where", ["gate", "up"])
@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
def test_swiglu_of_inf_or_nan_is_nan(lim, where, bad):
    rng = np.random.default_rng(1)
    g, u = (4 * rng.standard_normal(64)).astype(np.float32), (4 * rng.standard_normal(64)).astype(np.float32)
    (g if where == "gate" else u)[5] = bad
    out = np.empty(64, np.float32)
    try:
        swiglu_row(g, u, np.float32(lim), out)
    except ZeroDivisionError:  # Numba's check of silu's divisor, under fast-math, can meet a NaN gate:
        assert where == "gate" and np.isnan(bad)  # Model reports it as the same non-finite error
        return
    assert np.isnan(out[5])
    g64, u64 = g.astype(np.float64), u.astype(np.float64)
    with np.errstate(all="ignore"):  # the bad entry's own arithmetic, not compared
        a = g64 / (1 + np.exp(-g64))
    if lim:
        a, u64 = np.minimum(a, lim), np.clip(u64, -lim, lim)
    ok = np.arange(64) != 5
    np.testing.assert_allclose(out[ok], (a * u64)[ok], rtol=2e-6, atol=1e-6)


def _damaged(tmp_path, name: str, every_expert: bool) -> Path:
    """The shipped model with the first f16 scale of tensor `name` set to +Inf (of each expert's
    first row, for a stacked expert tensor: whichever experts the router picks)."""
    out = tmp_path / "damaged.gguf"
    shutil.copy(MODEL, out)
    t = next(t for t in gguf.GGUFReader(MODEL).tensors if t.name == name)
    field = F16_FIELDS[gguf.GGMLQuantizationType(t.tensor_type)][0]
    n = int(t.shape[-1]) if every_expert else 1  # gguf-py lists shapes fastest dimension first
    stride = int(t.n_bytes) // n
    with open(out, "r+b") as f:
        for e in range(n):
            f.seek(int(t.data_offset) + e * stride + field)
            f.write(np.float16(np.inf).tobytes())
    return out


@pytest.mark.parametrize("name, experts", [("blk.1.attn_q.weight", False), ("blk.1.ffn_up_exps.weight", True)])
@pytest.mark.parametrize("n_tokens", [1, 5, 40])  # a decode step, the few-token path, a prefill chunk
def test_the_default_path_refuses_a_file_with_an_inf_weight(tmp_path, name, experts, n_tokens):
    model = runtime.load(_damaged(tmp_path, name, experts), n_ctx=128, ram_budget=None)
    assert model.options.activations == "q8"
    ids = [(7 * i + 3) % model.cfg.vocab for i in range(n_tokens)]
    with pytest.raises(StepstreamError, match="NaN or Inf in the forward pass at positions 0..*: the blocks' "
                                              "hidden states are already non-finite; the evaluation was rolled back"):
        model.eval(ids)
    assert model.n_past == 0
    model.close()
