"""`stepstream plan`: what `run` would place where, the hit rate to expect, and the decode speed
the roofline allows, from the GGUF header alone.

Nothing here reads tensor data: sizes come from the tensor infos, so a file whose data is a
sparse hole (the real model's shapes, 111 GB apparent, nothing on disk) plans in well under a
second. The placement is offload.placement's own arithmetic (runtime_needs, choose_budget,
kv_cache_bytes) on a memory limit that is either this machine's or a machine with --ram of
memory and nothing else running.

The hit rate of the expert cache comes from, in order of preference:
    a routing trace (.npz, `stepstream profile --trace`): replayed by offload.simulate under
        the policy `run` would use, at the planned slot count;
    an expert profile (.json, `stepstream profile`): `run --profile` pins the hottest half of
        the slots and runs LRU on the rest; LRU's rate on the rest is Che's approximation under
        independent requests with the profile's frequencies.
Either must have been recorded on this very file (its name and size, and for a trace its MoE
layers, experts and top-k), as `run --profile` requires of a profile: another model's routing
says nothing of this one's.
    neither: uniform routing, slots / experts. This is what a random router gives: on a synth
        file's trace (2 MoE layers x 64 experts, top-8, 2000 random tokens) offload.simulate
        measured LRU at 23.8% with 25% of the experts and 48.6% with 50%. A trained router
        does better (locality between tokens): on the shipped miniature, 35.4% and 58.3%.

The roofline: a decode step reads every resident matrix, K experts per MoE layer and the KV
cache (at half the context, the mean over a context filled from empty) from RAM, and the
missed experts from disk; time per token = max(RAM bytes / RAM GB/s, missed bytes / disk GB/s).
The expected speed adds the two instead: a miss is known only once its layer's router has run,
and only the reads ahead of a guess overlap compute. On the 3-MoE-layer synth file under cgroup
caps of 35% and 55% (the same expert cache planned; --ram-gbps 34, the probe's figure there,
--disk-gbps 2.41, the benchmark's), the sum came within 6% and 15% of the measured decode
(10.7 and 13.6 tok/s planned, 10.1 and 11.9 measured) where the roofline said 15.7 and 22.9.
The RAM rate is the decode kernel's own, measured on a Q4_K matrix (measure_decode_gbps),
unless given.

Shape legend:  L MoE layers  E experts per layer  K experts per token  X = L*E
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from offload.direct_io import span_bytes
from offload.expert_table import build_expert_table
from offload.placement import LIBRARY_PAGES, choose_budget, kv_cache_bytes, kv_types_text, own_bytes, runtime_needs
from offload.provider import slot_bytes_for
from runtime.base import gguf_schema as N
from runtime.base.config import ModelConfig
from runtime.base.errors import StepstreamError
from runtime.base.gguf_file import GGUFModelFile
from runtime.base.memory_limit import MemoryLimit, size_text
from runtime.base.options import RuntimeOptions
from runtime.base.system import RESERVE_FRACTION, RESERVE_MIN, choose_wait_policy, memory_limit
from runtime.model.weights import check_formats

PIN_SHARE = 0.5  # offload.placement.build_streaming pins this share of the slots from a profile
GBPS_RANGE = (0.01, 10_000.0)  # rates outside it are typing slips: a floppy disk to ten times HBM


# ---------------------------------------------------------------- sizes from the header

def resident_bytes(f: GGUFModelFile, cfg: ModelConfig) -> int:
    """What offload.placement.make_resident copies to RAM, from tensor infos: every trunk-block
    tensor but the routed experts, the output norm and head (the embedding when tied), the rope
    factors. Vectors are copied as float32 (runtime.model.matrix.vector), rope factors as float64;
    the embedding stays mapped and MTP blocks are not used by plain decoding."""
    experts = {N.blk(i, name) for i in range(cfg.n_layers) for name in N.EXPERTS}
    trunk = tuple(f"blk.{i}." for i in range(cfg.n_layers))
    total = 0
    for name, t in f.tensors.items():
        if name in experts or not name.startswith(trunk):
            continue
        total += 4 * int(np.prod(t.shape)) if len(t.shape) == 1 else t.data.nbytes
    total += 4 * int(np.prod(f.tensor(N.OUTPUT_NORM).shape))
    total += f.tensors[N.OUTPUT].data.nbytes if N.OUTPUT in f.tensors else f.tensor(N.TOKEN_EMBD).data.nbytes
    if N.ROPE_FREQS in f.tensors:
        total += 8 * int(np.prod(f.tensors[N.ROPE_FREQS].shape))
    return total


def machine_limit(ram: int | None) -> MemoryLimit:
    """This machine's tightest memory limit, or an idle host with `ram` bytes: its free memory
    less the reserve runtime.base.system keeps for the OS."""
    if ram is None:
        return memory_limit()
    reserve = max(RESERVE_MIN, int(ram * RESERVE_FRACTION))
    return MemoryLimit("--ram", max(0, ram - reserve), ram, 0, reserve=reserve)


def measure_decode_gbps(rows: int = 32768, cols: int = 8192, repeats: int = 15, seconds: float = 0.6) -> float:
    """The rate, in GB/s of weights, at which the decode kernel (int8 activations, one token)
    goes through a Q4_K matrix several times larger than the caches (151 MB): the median of
    at least `repeats` products, and of as many as `seconds` holds (15 products, 45-75 ms, gave
    22 to 55 GB/s from run to run on a shared host, a review found: predictions 0.77-1.46x the
    measured speed).

    A memory copy's rate is the wrong figure on a few cores, where the kernel is compute-bound.
    The matrix must dwarf the last-level cache, as a decode step's gigabyte of weights does: a
    38 MB probe, which this VM's caches partly hold, gave 28-50 GB/s from run to run where the
    151 MB one gave 29-35, and a synth file's decode step (1.006 GB a token, all in RAM) ran at
    37 GB/s of weights. Attention over the KV cache, norms, routing and the calls themselves
    add a few percent on top of the weights' time.
    """
    from gguf import GGMLQuantizationType as Q

    choose_wait_policy(None)  # as `run` does: spinning OpenMP threads on a busy machine slow the kernel 10x
    from quant.int8_kernels import format_set
    from runtime.model.matrix import make_matrix, matmul

    raw = np.random.default_rng(0).integers(0, 256, (rows, cols // 256 * 144), dtype=np.uint8)
    blocks = raw.reshape(-1, 144)
    blocks[:, 0:4] = np.frombuffer(np.array([0.01, 0.01], np.float16).tobytes(), np.uint8)  # finite d and dmin
    m = make_matrix("decode probe", Q.Q4_K, (rows, cols), raw)
    x, int8 = np.ones((1, cols), np.float32), format_set([Q.Q4_K])
    matmul(x, m, int8)  # compiled or loaded from the cache, and the matrix's packed view built
    times = []
    start = time.perf_counter()
    while len(times) < repeats or time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        matmul(x, m, int8)
        times.append(time.perf_counter() - t0)
    return raw.nbytes / float(np.median(times)) / 1e9


# ---------------------------------------------------------------- hit rates

def che_lru(rates: np.ndarray, slots: int) -> float:
    """LRU's hit rate under independent requests with these rates (Che's approximation): the
    characteristic time T solves sum(1 - exp(-r T)) = slots; hit = sum(r (1 - exp(-r T))) / sum(r)."""
    r = np.asarray(rates, np.float64)
    r = r[r > 0]
    if slots <= 0 or r.size == 0:
        return 0.0
    if slots >= r.size:
        return 1.0
    lo, hi = 0.0, 1.0 / r.min()
    while np.sum(1 - np.exp(-r * hi)) < slots:
        hi *= 2
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if np.sum(1 - np.exp(-r * mid)) < slots else (lo, mid)
    return float(np.sum(r * (1 - np.exp(-r * hi))) / r.sum())


def pinned_hit_rate(counts: np.ndarray, slots: int, min_free: int) -> float:
    """`run --profile`: the int(slots * PIN_SHARE) hottest pinned (hit every time), LRU (Che) on
    the rest of the slots over the rest of the experts."""
    c = np.sort(np.asarray(counts, np.float64))[::-1]
    if c.sum() == 0:
        return 0.0
    n_pin = max(0, min(int(slots * PIN_SHARE), slots - min_free, c.size))
    rest = c[n_pin:]
    return float((c[:n_pin].sum() + che_lru(rest, slots - n_pin) * rest.sum()) / c.sum())


def _hit_rate(source: str | None, path: Path, slots: int, n_experts: int, top_k: int, layers: dict) -> tuple[float, str]:
    """(expected hit rate, where it came from) for `slots` cache slots. A profile or trace is read
    (and refused when it is none, as `run --profile` refuses it) even where every expert fits."""
    fits = (1.0, "every expert fits in the cache")
    if source is None:
        return fits if slots >= n_experts else (slots / n_experts, "uniform routing (a random router's): slots / experts")
    src = Path(source)
    if src.suffix == ".npz":
        from offload import simulate
        from offload.trace import RoutingTrace

        trace = RoutingTrace.load(src)
        trace.check_model(src, path, layers, top_k)
        if slots >= n_experts:
            return fits
        if trace.tokens == 0:
            raise StepstreamError(f"{src}: the routing trace holds no tokens; record one on some text "
                                  "(`stepstream profile -m MODEL -f TEXT --trace T.npz`)")
        keys = simulate.requests(trace.ids, trace.n_expert)
        rate = float(simulate.lru(keys, slots).mean())
        return rate, f"LRU replay of the routing trace {src.name} ({trace.tokens} tokens of this model)"
    from offload.profile import ExpertProfile

    prof = ExpertProfile.load(src, path)
    if slots >= n_experts:
        return fits
    counts = np.concatenate([np.asarray(prof.counts.get(l, [0] * e), np.float64) for l, e in sorted(layers.items())])
    return (pinned_hit_rate(counts, slots, top_k),
            f"profile {src.name}: the hottest {PIN_SHARE:.0%} of slots pinned, LRU on the rest "
            "(Che's approximation, independent requests)")


# ---------------------------------------------------------------- the plan

@dataclass(frozen=True)
class Plan:
    model: str
    file_bytes: int
    n_ctx: int
    moe_layers: int
    experts_per_layer: int
    top_k: int
    expert_bytes: int  # one routed expert (the largest layer's: a cache slot)
    streams: bool  # False: the whole file fits and every expert stays mapped
    memory: str  # the limit the budget comes from
    ram_bytes: int  # the memory that limit is of: --ram, else this machine's (or its cgroup's limit)
    usable_bytes: int  # what that limit leaves for the model: after the reserve and what others use
    resident_bytes: int  # non-expert weights copied to RAM
    kv_bytes: int  # the KV cache at n_ctx
    kv_types: tuple[str, str]  # its key and value types (--cache-type-k/v)
    runtime_bytes: int  # the runtime's own memory with a full context (kv_bytes included)
    reserve_bytes: int  # kept back by the limit for the OS and the runtime (usable_bytes is what is left)
    cache_bytes: int
    cache_slots: int
    n_experts: int
    cached_per_layer: float
    hit_rate: float
    hit_source: str
    ram_gbps: float
    ram_gbps_source: str
    disk_gbps: float
    ram_read_per_token: int  # bytes read from RAM per decoded token
    disk_read_per_token: float  # expected bytes of missed experts per token
    compute_s: float
    disk_s: float
    tok_s: float  # the roofline: compute and reads fully overlapped
    bound: str  # "compute" or "disk"
    expected_tok_s: float  # compute, then the misses' reads (see the module's docstring)
    prompt_cache_bytes: int = 0  # a server's kept KV caches (serve --cache-ram), taken from the expert cache

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def json(self) -> str:
        return json.dumps(self.as_dict())

    def text(self) -> str:
        gb = 1e9
        where = (f"expert cache {size_text(self.cache_bytes)} = {self.cache_slots} of {self.n_experts} experts "
                 f"({self.cache_slots / self.n_experts:.0%}), {self.cached_per_layer:.1f} per MoE layer"
                 if self.streams else "every routed expert mapped from the file (the model fits)")
        return "\n".join([
            f"plan for {self.model}: {self.file_bytes / gb:.1f} GB, {self.moe_layers} MoE layers x "
            f"{self.experts_per_layer} experts of {self.expert_bytes / 2**20:.2f} MiB, top-{self.top_k}; "
            f"context {self.n_ctx}",
            f"memory: {self.memory}: {size_text(self.usable_bytes)} for the model",
            f"placement: {size_text(self.resident_bytes)} resident (attention, shared experts, dense, head); "
            f"KV cache {size_text(self.kv_bytes)} at {self.n_ctx} positions ({kv_types_text(self.kv_types)}); runtime "
            f"{size_text(self.runtime_bytes - self.kv_bytes)}"
            + (" (both inside the reserve)" if self.runtime_bytes <= self.reserve_bytes else
               f" ({size_text(self.reserve_bytes)} of the two inside the reserve)" if self.reserve_bytes else "")
            + (f"; prompt cache {size_text(self.prompt_cache_bytes)} (serve --cache-ram)"
               if self.prompt_cache_bytes else "")
            + f"; {where}",
            f"hit rate: {self.hit_rate:.1%} ({self.hit_source})",
            f"per token: {self.ram_read_per_token / gb:.3f} GB read from RAM, "
            f"{self.disk_read_per_token / gb:.3f} GB of missed experts from disk",
            f"roofline: compute {1e3 * self.compute_s:.1f} ms at {self.ram_gbps:.1f} GB/s ({self.ram_gbps_source}), "
            f"disk {1e3 * self.disk_s:.1f} ms at {self.disk_gbps:.1f} GB/s -> {self.tok_s:.1f} tok/s "
            f"(bound by {self.bound})",
            f"expected: {self.expected_tok_s:.1f} tok/s "
            + ("(compute, then the misses' reads: a miss is known once its layer's router has run)"
               if self.disk_s > 0 else "(compute alone: nothing is read from disk)"),
        ])


def make_plan(path: str | Path, ram: int | None = None, disk_gbps: float = 7.0, ram_gbps: float | None = None,
              n_ctx: int | None = None, profile: str | None = None, cache_type_k: str = "f16",
              cache_type_v: str = "f16", n_batch: int = 64, prompt_cache: int | str = 0) -> Plan:
    """The plan for the GGUF at `path` on a machine with `ram` bytes (None: this machine), its
    KV cache in the given types (run's defaults unless given), prompts going `n_batch` tokens at
    a time (run's -b; bench's is 512, whose larger activations leave a smaller expert cache),
    and `prompt_cache` bytes (or "auto") of a server's kept KV caches (serve --cache-ram; run
    keeps none)."""
    lo, hi = GBPS_RANGE
    for flag, rate in (("--disk-gbps", disk_gbps), ("--ram-gbps", ram_gbps)):
        if rate is not None and not lo <= rate <= hi:
            raise StepstreamError(f"{flag} {rate:g}: give a rate between {lo:g} and {hi:,.0f} GB/s")
    f = GGUFModelFile(path)
    cfg = ModelConfig.from_gguf(f)
    check_formats(f)  # a file `run` refuses gets no plan either
    if n_ctx is not None and n_ctx > cfg.context_length:
        raise StepstreamError(f"--ctx {n_ctx} exceeds the model's context length {cfg.context_length}")
    opts = RuntimeOptions.from_kwargs(n_ctx=n_ctx, cache_type_k=cache_type_k, cache_type_v=cache_type_v,
                                      n_batch=n_batch, prompt_cache=prompt_cache)
    ctx = opts.context(cfg.context_length)
    if opts.n_batch > ctx:  # as the loader clamps it
        opts = dataclasses.replace(opts, n_batch=ctx)
    types = opts.kv_types
    table = build_expert_table(f, cfg)
    slot = slot_bytes_for(table)
    n_experts = sum(l.n_expert for l in table.layers.values())
    all_experts = slot * n_experts
    resident = resident_bytes(f, cfg)
    limit = machine_limit(ram)
    usable = limit.free
    # the tokenizer still to build; the MTP heads' caches when the file has heads (`run` drafts by default)
    heads = cfg.n_mtp if cfg.n_mtp and N.blk(cfg.n_layers, N.NEXTN_EH_PROJ) in f.tensors else 0
    kept = opts.prompt_cache_bytes(usable)  # as the loader makes "auto" bytes
    needs = runtime_needs(cfg, ctx, opts.rollback, limit, types, opts.n_batch, mtp_heads=heads, kept=kept)
    kv = needs.kv_bytes
    streams = f.nbytes + needs.full > usable  # runtime.loader: stream when the mapped file would not fit
    K = cfg.n_expert_used
    if streams:
        depth = max(1, K * 3 // 4)  # build_streaming's smallest useful cache: K and the read-ahead
        budget, _ = choose_budget(f.path.name, None, usable, limit, resident, needs, slot, K + depth, all_experts)
        slots = min(budget, all_experts) // slot
    else:
        slots = n_experts
    layers = {l: le.n_expert for l, le in table.layers.items()}
    hit, source = _hit_rate(profile, f.path, slots, n_experts, K, layers)
    ram_src = "given"
    if ram_gbps is None:
        ram_gbps, ram_src = measure_decode_gbps(), "measured here: the Q4_K decode kernel"
    routed = K * sum(le.expert_bytes for le in table.layers.values())  # one token's experts
    read = K * sum(sum(span_bytes(s) for s in le.strides) for le in table.layers.values())  # as O_DIRECT reads them
    ram_read = resident + routed + kv_cache_bytes(cfg, ctx, opts.rollback, held=ctx // 2, kv_types=types)
    missed = (1.0 - hit) * read if streams else 0.0
    compute_s, disk_s = ram_read / (ram_gbps * 1e9), missed / (disk_gbps * 1e9)
    memory = f"an idle {limit.text()}" if ram is not None else limit.text()
    return Plan(f.path.name, f.nbytes, ctx, len(table.layers), cfg.n_expert, K, slot, streams, memory,
                ram if ram is not None else limit.limit, usable,
                resident, kv, types, own_bytes(cfg, opts.n_batch, False) + LIBRARY_PAGES + kv, limit.reserve,
                slots * slot if streams else 0, slots, n_experts, slots / len(table.layers), hit, source,
                ram_gbps, ram_src, disk_gbps, ram_read, missed, compute_s, disk_s,
                1.0 / max(compute_s, disk_s), "disk" if disk_s > compute_s else "compute", 1.0 / (compute_s + disk_s),
                kept)
