"""llama.cpp (through llama-cpp-python) as a reference."""

from __future__ import annotations

from pathlib import Path

import numpy as np


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
