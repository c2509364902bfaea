"""The composition root: open a GGUF, build the model, and give it the expert provider that fits.

Routed experts stay in RAM (views of the mapped file) when the model fits in the memory
this process may take now (the tightest of the host's available memory, its cgroup's limit
and RLIMIT_AS: runtime.base.system), and stream from disk through offload's expert cache
otherwise, or when the options ask for it (a RAM budget, a profile, `experts="stream"`).
"""

from __future__ import annotations

from pathlib import Path

from gguf import GGMLQuantizationType as Q

from offload.placement import build_streaming, runtime_needs
from runtime.base import system
from runtime.base.config import ModelConfig
from runtime.base.errors import StepstreamError
from runtime.base.gguf_file import GGUFModelFile
from runtime.base.options import RuntimeOptions
from runtime.model.experts import InMemoryExperts
from runtime.model.model import Model
from runtime.model.weights import expert_bank, load_weights


def _streams(opts: RuntimeOptions, file_bytes: int, runtime_bytes: int, usable: int) -> bool:
    chosen = opts.streams_by_choice()
    if chosen is not None:
        return chosen
    # Mapped, the whole file ends up in page cache, which a cgroup charges to us.
    return file_bytes + runtime_bytes > usable


def load(path: str | Path, **options) -> Model:
    """Open a Step-3.5 GGUF (any part of a split file) for inference."""
    opts = RuntimeOptions.from_kwargs(**options)
    f = GGUFModelFile(path)
    cfg = ModelConfig.from_gguf(f)
    if opts.n_ctx is not None and opts.n_ctx > cfg.context_length:
        raise StepstreamError(f"n_ctx={opts.n_ctx} exceeds the model's context length {cfg.context_length}")
    if opts.n_threads is not None:
        system.set_threads(opts.n_threads)
    weights = load_weights(f, cfg)
    if weights.blocks[0].q.qtype != Q.F32:
        # Quantized weights: BLAS does only small products (router, prefill attention). Its
        # pool's threads keep spinning after each call and take the cores from the kernels'
        # threads: measured here, one BLAS thread doubled prefill (90 -> 207 tok/s).
        system.set_blas_threads(1)
    limit, usable = system.memory_limit(), system.usable_memory()
    runtime = runtime_needs(cfg, opts.context(cfg.context_length), opts.rollback, limit)
    if not _streams(opts, f.nbytes, runtime.full, usable):
        provider = InMemoryExperts({i: expert_bank(f, cfg, i) for i in range(cfg.n_layers) if cfg.moe[i]})
        return Model(f, cfg, weights, provider, opts)
    weights, provider, placement = build_streaming(f, cfg, weights, opts.ram_budget, limit, usable, runtime,
                                                   opts.cache_policy, opts.profile, direct_io=opts.direct_io)
    return Model(f, cfg, weights, provider, opts, placement)
