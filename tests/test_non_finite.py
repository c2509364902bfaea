"""Weights that hold NaN or Inf (a damaged file, a bad conversion) give one clear error that
says where the non-finite values start, and leave the model where it was: sampling from NaN
logits used to raise numpy's "Probabilities contain NaN" (exit 1) or, greedy, emit nothing.

Reference: the same model evaluated without the failed call, bit for bit."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader

import runtime
from runtime.base.errors import StepstreamError

EMBEDDED = Path(runtime.__file__).parent / "data" / "step35-mini-q4_k_m.gguf"
Q6_K_BLOCK = 210  # bytes; the block's f16 scale d is its last two


def _with_nan_scale(tmp_path: Path, tensor: str) -> Path:
    """A copy of the embedded model whose `tensor` (Q6_K) has a NaN scale in its first block."""
    out = tmp_path / f"nan-{tensor}.gguf"
    shutil.copyfile(EMBEDDED, out)
    t = next(t for t in GGUFReader(EMBEDDED).tensors if t.name == tensor)
    assert t.tensor_type.name == "Q6_K"
    with open(out, "r+b") as f:
        f.seek(int(t.data_offset) + Q6_K_BLOCK - 2)
        f.write(np.array([np.nan], np.float16).tobytes())
    return out


@pytest.mark.parametrize("tensor, where", [("output.weight", "output head"),
                                           ("blk.0.attn_output.weight", "hidden states")])
def test_nan_weights_give_one_error_naming_where(tmp_path, tensor, where):
    path = _with_nan_scale(tmp_path, tensor)
    m = runtime.load(path, experts="ram")
    for ids in ([5], [5, 6, 7, 8], list(range(5, 25))):  # decode, few-token and prefill paths
        with pytest.raises(StepstreamError, match=where) as e:
            m.eval(ids)
        msg = str(e.value)
        assert msg.startswith(f"{path}: NaN or Inf") and f"positions 0..{len(ids) - 1}" in msg, msg
        assert m.n_past == 0 and m.history == []


def test_the_failed_evaluation_is_rolled_back(monkeypatch):
    ids = np.random.default_rng(3).integers(4, 2048, 9).tolist()
    ref = runtime.load(EMBEDDED, experts="ram")
    want = ref.eval(ids, all_logits=True)
    m = runtime.load(EMBEDDED, experts="ram")
    m.eval(ids[:6])
    real = m.output
    monkeypatch.setattr(m, "output", lambda h: np.full((h.shape[0], 2048), np.nan, np.float32))
    with pytest.raises(StepstreamError, match="positions 6..8"):
        m.eval(ids[6:])
    assert m.n_past == 6 and m.history == ids[:6]
    monkeypatch.setattr(m, "output", real)
    np.testing.assert_array_equal(m.eval(ids[6:], all_logits=True), want[6:])
