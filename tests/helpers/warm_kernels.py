"""Compile the kernels most test files share into Numba's cache, once, before the workers start.

`python -m tests.helpers.warm_kernels` runs the shipped model through each of its paths (a
prefill chunk, decode steps, a few-token pass, MTP drafting with its verify passes, the int8
and float outputs) and converts and runs the tiny checkpoint in the types the fixtures use.
On a cold cache every pytest-xdist worker would otherwise compile these same kernels at the
same time, each on its own, on cores that the others need (tests/conftest.py runs this first).
It only fills the cache: nothing a test checks depends on it, and a test that wants a fresh
compile points NUMBA_CACHE_DIR elsewhere.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np


def shipped_model() -> None:
    import runtime
    from runtime.cli.demo import model_path

    model = runtime.load(model_path(), n_ctx=256)
    ids = np.random.default_rng(0).integers(1, model.cfg.vocab, 40).tolist()
    model.logits(ids[:24])  # a prefill chunk, all logits
    model.eval(ids[24:25])  # a decode step
    model.eval(ids[25:29])  # a few-token pass
    model.reset()
    for mtp in (0, 2):
        list(model.generate(ids[:12], max_tokens=8, mtp=mtp))


def tiny_models(tmp: Path) -> None:
    import runtime
    from convert.converter import convert
    from convert.mini import write_mini

    ckpt = write_mini(tmp / "tiny", "tiny", seed=0)
    for ftype in ("q4_k_m", "f32"):
        path = tmp / f"tiny-{ftype}.gguf"
        convert(ckpt, path, ftype, progress=False)
        model = runtime.load(path, n_ctx=64)
        model.logits(list(range(1, 12)))
        model.eval([5])


def main() -> int:
    shipped_model()
    with tempfile.TemporaryDirectory() as tmp:
        tiny_models(Path(tmp))
    return 0


if __name__ == "__main__":
    sys.exit(main())
