"""Shared fixtures: miniature checkpoints and their GGUFs, made once per test session."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests/ helpers such as reference_model

os.environ.setdefault("NUMBA_NUM_THREADS", "2")


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    from convert.mini import write_mini

    return write_mini(tmp_path_factory.mktemp("ckpt") / "tiny", "tiny", seed=0)


_GGUF_CACHE: dict[str, Path] = {}


@pytest.fixture(scope="session")
def tiny_gguf(tiny_ckpt, tmp_path_factory):
    """tiny_gguf(ftype) -> path of the tiny checkpoint converted to that type (cached)."""
    from convert.converter import convert

    out_dir = tmp_path_factory.mktemp("gguf")

    def get(ftype: str) -> Path:
        if ftype not in _GGUF_CACHE:
            path = out_dir / f"tiny-{ftype}.gguf"
            convert(tiny_ckpt, path, ftype, progress=False)
            _GGUF_CACHE[ftype] = path
        return _GGUF_CACHE[ftype]

    return get


def llama_cpp_logits(path: Path, tokens: list[int], n_ctx: int | None = None) -> np.ndarray:
    """llama.cpp's logits for every position of `tokens`, evaluated from an empty cache."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx or max(64, len(tokens) + 8), n_batch=512,
                          logits_all=True, n_threads=2, verbose=False)
    try:
        llm.eval(tokens)
        return np.array(llm.scores[: len(tokens)], dtype=np.float32)
    finally:
        llm.close()
