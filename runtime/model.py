"""A loaded Step-3.5 model: its weights, expert provider, KV cache and position.

    h = embed(tokens)
    for each trunk block: h = block(h)         (chunked prefill, or one token at a time)
    logits = output(norm(h))

Tokens are evaluated at the cache's current position; `trim(n)` rolls it back.

Shape legend:  T tokens   H hidden   V vocab
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from runtime.config import ModelConfig
from runtime.errors import StepstreamError
from runtime.experts import ExpertProvider, InMemoryExperts
from runtime.forward import block, block_spec
from runtime.gguf_file import GGUFModelFile
from runtime.kv_cache import KVCache
from runtime.layers import rms_norm
from runtime.options import RuntimeOptions
from runtime.tensors import matmul, rows
from runtime.weights import ModelWeights, expert_bank, load_weights


class Model:
    def __init__(self, file: GGUFModelFile, cfg: ModelConfig, weights: ModelWeights,
                 provider: ExpertProvider, options: RuntimeOptions):
        self.file = file
        self.cfg = cfg
        self.weights = weights
        self.provider = provider
        self.options = options
        self.n_ctx = options.n_ctx or min(cfg.context_length, 4096)
        self._specs = [block_spec(cfg, i, weights.rope_factors) for i in range(cfg.n_layers)]
        self.cache = KVCache(cfg.n_head_kv[: cfg.n_layers], cfg.head_dim, cfg.sliding[: cfg.n_layers],
                             cfg.window, self.n_ctx, options.rollback)
        self._tokenizer = None

    # ------------------------------------------------------------------ state

    @property
    def n_past(self) -> int:
        return self.cache.n_past

    def reset(self) -> None:
        self.cache.reset()

    def trim(self, n: int) -> None:
        """Forget the last n evaluated positions."""
        self.cache.trim(n)

    def close(self) -> None:
        self.provider.close()

    # ------------------------------------------------------------------ compute

    def _check_tokens(self, tokens) -> np.ndarray:
        ids = np.asarray(tokens)
        if ids.ndim != 1:
            raise StepstreamError(f"tokens must be a 1-D sequence of ids, got shape {list(ids.shape)}")
        if ids.size and not np.issubdtype(ids.dtype, np.integer):
            raise StepstreamError(f"tokens must be integers, got {ids.dtype}")
        ids = ids.astype(np.int64)
        bad = ids[(ids < 0) | (ids >= self.cfg.vocab)]
        if bad.size:
            raise StepstreamError(f"token id {int(bad[0])} is outside the vocabulary (0..{self.cfg.vocab - 1})")
        if self.n_past + ids.size > self.n_ctx:
            raise StepstreamError(
                f"{ids.size} tokens after {self.n_past} cached positions exceed the context of {self.n_ctx} "
                f"(load with a larger n_ctx, at most the model's {self.cfg.context_length})"
            )
        return ids

    def hidden(self, tokens) -> np.ndarray:
        """Evaluate tokens at the current position; last trunk hidden state [T, H] (pre-norm)."""
        ids = self._check_tokens(tokens)
        out = []
        for a in range(0, ids.size, self.options.n_batch):
            chunk = ids[a : a + self.options.n_batch]
            pos = np.arange(self.n_past, self.n_past + chunk.size, dtype=np.int64)
            h = rows(self.weights.embed, chunk)  # [T, H]
            for s, w, kv in zip(self._specs, self.weights.blocks, self.cache.layers):
                h = block(s, w, h, pos, kv, self.provider)
            self.cache.advance(chunk.size)
            out.append(h)
        return np.concatenate(out) if out else np.zeros((0, self.cfg.hidden), np.float32)

    def output(self, h: np.ndarray) -> np.ndarray:
        """Logits [T, V] float32 of hidden states [T, H]."""
        return matmul(rms_norm(h, self.weights.out_norm, self.cfg.rms_eps), self.weights.output).astype(np.float32)

    def eval(self, tokens, all_logits: bool = False) -> np.ndarray:
        """Evaluate tokens after the cached ones: logits of the last token [V], or of all [T, V]."""
        h = self.hidden(tokens)
        if h.shape[0] == 0:
            raise StepstreamError("eval needs at least one token")
        return self.output(h) if all_logits else self.output(h[-1:])[0]

    def logits(self, tokens) -> np.ndarray:
        """[T, V] float32 logits of every position, evaluated from an empty cache."""
        self.reset()
        return self.eval(tokens, all_logits=True)


def load(path: str | Path, **options) -> Model:
    """Open a Step-3.5 GGUF (any part of a split file) for inference."""
    opts = RuntimeOptions.from_kwargs(**options)
    f = GGUFModelFile(path)
    cfg = ModelConfig.from_gguf(f)
    if opts.n_ctx is not None and opts.n_ctx > cfg.context_length:
        raise StepstreamError(f"n_ctx={opts.n_ctx} exceeds the model's context length {cfg.context_length}")
    if opts.n_threads is not None:
        from runtime.threads import set_threads

        set_threads(opts.n_threads)
    weights = load_weights(f, cfg)
    provider = InMemoryExperts({i: expert_bank(f, cfg, i) for i in range(cfg.n_layers) if cfg.moe[i]})
    return Model(f, cfg, weights, provider, opts)
