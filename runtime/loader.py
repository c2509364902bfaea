"""The composition root: open a GGUF, build the model, and give it the expert provider that fits.

Routed experts stay in RAM (views of the mapped file) when the model fits in the memory
this process may take now (the tightest of the host's available memory, its cgroup's limit
and RLIMIT_AS: runtime.base.system), and stream from disk through offload's expert cache
otherwise, or when the options ask for it (a RAM budget, a profile, `experts="stream"`).
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

from gguf import GGMLQuantizationType as Q

from offload.placement import build_streaming, runtime_needs
from runtime.base import system
from runtime.base.config import ModelConfig
from runtime.base.errors import StepstreamError, UnknownOption
from runtime.base.gguf_file import GGUFModelFile
from runtime.base.options import RuntimeOptions
from runtime.model.experts import InMemoryExperts
from runtime.model.model import Model
from runtime.model.weights import expert_bank, load_weights
from runtime.text.tokenizer import Tokenizer


def _streams(opts: RuntimeOptions, file_bytes: int, runtime_bytes: int, usable: int, in_memory: bool = False) -> bool:
    chosen = opts.streams_by_choice()
    if chosen is not None:
        return chosen
    # Mapped, the whole file ends up in page cache, which a cgroup charges to us. A file on
    # tmpfs is memory already (charged to whoever wrote it): mapping it takes none more, and
    # streaming it would only copy experts from memory to memory (3.5x slower, measured).
    return (0 if in_memory else file_bytes) + runtime_bytes > usable


def load(path: str | Path | None = None, **options) -> Model:
    """Open a Step-3.5 GGUF (any part of a split file) for inference; the path may also be given
    as `model_path=`, llama-cpp-python's name."""
    if "model_path" in options:
        if path is not None:
            raise UnknownOption("give the model's path once: as the first argument or as model_path=, not both")
        path = options.pop("model_path")
    if path is None:
        raise UnknownOption("load() needs the model's path (the first argument, or model_path=)")
    opts = RuntimeOptions.from_kwargs(**options)
    f = GGUFModelFile(path)
    cfg = ModelConfig.from_gguf(f)
    if opts.n_ctx is not None and opts.n_ctx > cfg.context_length:
        raise StepstreamError(f"n_ctx={opts.n_ctx} exceeds the model's context length {cfg.context_length}")
    if opts.n_batch > opts.context(cfg.context_length):  # a chunk longer than the cache holds nothing more (llama.cpp clamps it too)
        opts = replace(opts, n_batch=opts.context(cfg.context_length))
    if opts.n_threads is not None:
        system.set_threads(opts.n_threads)
    system.keep_freed_memory()
    # Before the limits are read, so that they see its memory (~100 MiB for the real model's
    # vocabulary); a file it cannot read a tokenizer from still loads, for token ids.
    tokenizer = _tokenizer_or_none(f)
    weights = load_weights(f, cfg)
    if weights.blocks[0].q.qtype != Q.F32:
        # Quantized weights: BLAS does only small products (router, prefill attention). Its
        # pool's threads keep spinning after each call and take the cores from the kernels'
        # threads: measured here, one BLAS thread doubled prefill (90 -> 207 tok/s).
        system.set_blas_threads(1)
    limit, usable = system.memory_limit(), system.usable_memory()
    # "auto" made bytes, for the server (on the GPU tier too: kept states are copied back to RAM)
    opts = replace(opts, prompt_cache=opts.prompt_cache_bytes(usable))
    runtime = runtime_needs(cfg, opts.context(cfg.context_length), opts.rollback, limit, opts.kv_types,
                            opts.n_batch, tokenizer_built=tokenizer is not None,
                            mtp_heads=len(weights.nextn) if opts.mtp != 0 else 0, kept=opts.prompt_cache)
    placement = None
    # Under RLIMIT_AS the file is mapped already (its address space counted in the limit's use),
    # and streaming maps it too, beside a cache: it takes more address space, never less (a
    # review: `ulimit -v` refused to stream a model that runs mapped).
    mapped_already = limit.kind == "RLIMIT_AS" or all(system.in_memory_file(p) for p in f.parts)
    if not _streams(opts, f.nbytes, runtime.full, usable, in_memory=mapped_already):
        provider = InMemoryExperts({i: expert_bank(f, cfg, i) for i in range(cfg.n_layers) if cfg.moe[i]})
    else:
        weights, provider, placement = build_streaming(f, cfg, weights, opts.ram_budget, limit, usable, runtime,
                                                       opts.cache_policy, opts.profile, direct_io=opts.direct_io,
                                                       fill=opts.fill_cache, fit=opts.ram_budget_fit)
    gpu = gpu_placement = None
    if opts.gpu_budget is not None:
        try:
            gpu, gpu_placement = _gpu_tier(f, cfg, weights, provider, opts)
        except BaseException:
            provider.close()
            raise
    return Model(f, cfg, weights, provider, opts, placement, gpu, gpu_placement, tokenizer=tokenizer)


def _tokenizer_or_none(f: GGUFModelFile) -> Tokenizer | None:
    try:
        return Tokenizer.from_gguf(f)
    except Exception:  # whatever it was, raised again when text is asked for (Model.tokenizer)
        return None


def _gpu_tier(f: GGUFModelFile, cfg: ModelConfig, weights, provider, opts: RuntimeOptions):
    """The GPU executor and its placement: non-expert weights and the KV cache in VRAM, then as
    many routed experts as the budget holds (all of them copied now when they all fit; else
    learned online, the rest computed on the CPU or copied as the measured costs say)."""
    from quant import cuda_kernels

    if not cuda_kernels.available():
        raise StepstreamError("gpu_budget (--gpu-budget) needs an NVIDIA GPU and numba-cuda (pip install "
                              "'stepstream[gpu]'); none was found")
    from numba import cuda

    from offload.expert_table import build_expert_table
    from offload.gpu_placement import plan_gpu
    from offload.vram_experts import VRAMExperts
    from quant.int8_kernels import format_set
    from runtime.model.gpu.executor import GPUExecutor

    free = cuda.current_context().get_memory_info()[0]
    free = int(free) if math.isfinite(free) else None  # numba's simulator reports an unbounded card
    table = build_expert_table(f, cfg) if any(cfg.moe[: cfg.n_layers]) else None
    n_experts = sum(l.n_expert for l in table.layers.values()) if table else 0
    n_ctx = opts.context(cfg.context_length)
    plan = plan_gpu(cfg, weights, table.total_bytes if table else 0, n_experts, n_ctx, opts.rollback,
                    opts.gpu_budget, free, f.path.name)
    tier = VRAMExperts(plan.slots)
    int8 = format_set(t.qtype for t in f.tensors.values())
    # A chunk stores its keys before it attends: on sliding blocks it must fit the ring's spare slots.
    chunk = max(1, min(opts.n_batch, opts.rollback + 1)) if any(cfg.sliding[: cfg.n_layers]) else opts.n_batch
    gpu = GPUExecutor(cfg, weights, provider, tier, plan.slots, plan.slot_bytes, n_experts, n_ctx, opts.rollback,
                      int8, chunk)
    if table is not None:
        if plan.slots >= n_experts:
            gpu.preload((layer, e) for layer, le in table.layers.items() for e in range(le.n_expert))
        else:
            if opts.profile is not None:  # the profile's hottest experts start in VRAM; the rest is learned
                from offload.profile import ExpertProfile
                gpu.preload(ExpertProfile.load(opts.profile, f.path).hottest(plan.slots, table))
            gpu.calibrate(min(table.layers))
    return gpu, plan
