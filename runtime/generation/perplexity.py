"""Perplexity over a text, computed the way llama.cpp's `llama-perplexity` computes it.

The text is tokenized once (with BOS when the model adds one) and cut into chunks of
n_ctx tokens; a partial last chunk is dropped. Each chunk is evaluated from an empty
cache with its first token replaced by BOS (when the model uses one), and only the
second half is scored: the logits at positions n_ctx/2 .. n_ctx-2 against the tokens
that follow them. PPL = exp(mean negative log-likelihood) over all scored tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

from runtime.base.errors import StepstreamError


@dataclass(frozen=True)
class PerplexityResult:
    ppl: float
    nll: float  # mean negative log-likelihood, nats
    stderr: float  # of the PPL estimate, as llama.cpp reports it
    n_tokens: int  # scored tokens
    n_chunks: int


def chunk_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """-log softmax(logits)[target] per row, in float64: logits [N, V], targets [N]."""
    z = logits.astype(np.float64)
    z -= z.max(axis=-1, keepdims=True)
    logz = np.log(np.exp(z).sum(axis=-1))
    return logz - z[np.arange(len(targets)), targets]


def check_length(n_tokens: int, n_ctx: int) -> None:
    """Refuse a context too small, or a text too short for two chunks of it (the first half of
    each chunk is context only, as in llama-perplexity)."""
    if n_ctx < 4:
        raise StepstreamError(f"context of {n_ctx} tokens is too small for perplexity")
    if n_tokens < 2 * n_ctx:
        raise StepstreamError(f"the text has {n_tokens} token{'' if n_tokens == 1 else 's'}; perplexity with a "
                              f"context of {n_ctx} needs at least {2 * n_ctx}")


def perplexity(eval_chunk: Callable[[list[int]], np.ndarray | Iterable[np.ndarray]], tokens: list[int], n_ctx: int,
               bos_id: int | None, n_chunks: int | None = None,
               progress: Callable[[int, float], None] | None = None) -> PerplexityResult:
    """eval_chunk(ids) -> logits [len(ids), V] from an empty cache, or an iterable of the scored
    rows' logits (positions n_ctx/2 .. n_ctx-2) in blocks of rows, in order: the command's way,
    so that a chunk's [n_ctx, V] logits and their float64 copies are never all held (a review:
    750 MiB at -c 512 over the real vocabulary, beyond the RAM budget, and an OOM kill under a
    cgroup cap). progress(chunks done, the running estimate) after each chunk, as
    llama-perplexity prints [1]52.70,[2]49.67,..."""
    check_length(len(tokens), n_ctx)
    total = len(tokens) // n_ctx
    n = total if n_chunks is None or n_chunks < 0 else min(n_chunks, total)
    first = n_ctx // 2
    nlls = []
    total, count = 0.0, 0  # the running estimate's sums
    for i in range(n):
        chunk = list(tokens[i * n_ctx : (i + 1) * n_ctx])
        if bos_id is not None:
            chunk[0] = bos_id
        logits = eval_chunk(chunk)
        targets = np.asarray(tokens[i * n_ctx + first + 1 : (i + 1) * n_ctx])
        blocks = [logits[first : n_ctx - 1]] if isinstance(logits, np.ndarray) else logits
        parts, done = [], 0
        for block in blocks:
            parts.append(chunk_nll(block, targets[done : done + len(block)]))
            done += len(block)
        if done != len(targets):
            raise ValueError(f"eval_chunk gave {done} scored rows for {len(targets)} targets")
        nlls.append(np.concatenate(parts))
        total, count = total + float(nlls[-1].sum()), count + len(nlls[-1])
        if progress is not None:
            progress(i + 1, float(np.exp(total / count)))
    nll = np.concatenate(nlls)
    mean = float(nll.mean())
    var = float((nll ** 2).mean() - mean ** 2)
    ppl = float(np.exp(mean))
    stderr = float(np.sqrt(var / (len(nll) - 1)) * ppl) if var > 0 and len(nll) > 1 else 0.0
    return PerplexityResult(ppl, mean, stderr, len(nll), n)
