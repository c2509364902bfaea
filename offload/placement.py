"""Where each part of the model lives when routed experts stream from disk.

Everything that is not a routed expert is copied into RAM once (attention, norms, router,
shared experts, dense layers, the output head), so it never competes with the experts
for page cache; embedding rows stay memory-mapped and are read on demand. Routed
experts live in the expert cache, whose size is the RAM budget.

The default budget is what the tightest memory limit leaves (runtime.base.system:
the host's available memory less a reserve, a cgroup's limit less its usage, or
RLIMIT_AS) after the resident weights and the runtime's own memory with a full context,
and never more than all the experts. When the model cannot even start under the limit,
with the smallest useful cache or an asked-for budget, loading stops with one line that
gives the amount needed and the limit, before anything is allocated: an OOM kill says
nothing.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass

import numpy as np

from offload.cache import ExpertCache
from offload.direct_io import DirectReader
from offload.expert_table import ExpertTable, build_expert_table
from offload.profile import ExpertProfile
from offload.provider import StreamingExperts, slot_bytes_for
from runtime.base.config import ModelConfig
from runtime.base.errors import StepstreamError
from runtime.base.gguf_file import GGUFModelFile
from runtime.base.memory_limit import MemoryLimit, size_text
from runtime.base.options import KV_TYPE_BYTES, check_kv_type
from runtime.base.units import parse_bytes
from runtime.model.kv_cache import START_CAPACITY, ring_window
from runtime.model.matrix import Matrix, make_matrix
from runtime.model.mtp import held_state_bytes

# The runtime's own memory beside the weights, the expert cache and the KV cache, beyond what
# it held when the limit was read. Anonymous memory, which no limit can take back: compiled
# kernels (LLVM), decode buffers, the MTP heads' hidden states and caches, reader and OpenMP
# thread stacks. Measured under a cgroup-v1 cap, `stepstream run` on the `stress` miniature
# with a 2,668-token prompt: 94 MiB beyond the usage at placement, the resident weights and
# the expert cache with the MTP heads drafting (--mtp auto, the default), 68 MiB without; the
# warm-up's kernels of the prefill, few-token and decode paths are 54 MiB of it. (It was 40
# MiB, measured when the warm-up loaded fewer kernels and before the heads drafted: a review
# had that run OOM-killed at a 360 MiB cap whose default budget said it fit.) Pages of library
# code it keeps touching, which a cgroup charges too but can reclaim, at the price of reading
# them again and again (~40 MiB, as runtime.bench.streaming's FILE_WORKING_SET).
RUNTIME_ANON = 96 * 2**20
# Of it, what the process holds once loaded and warmed up, before a prompt: the warm-up's kernels
# (54 MiB) and the load's buffers (10 MiB), measured the same way. An asked --ram-budget is taken
# when the model can start with it and run one prefill chunk of n_batch tokens (the resident
# weights, this, that chunk's activations, the KV cache as it starts). Without the activations a
# review's run was OOM-killed at the "largest budget that fits" (713 MiB under a 1.5 GiB cap at
# the real widths, -b 512: 168 MiB of activations); with all of RUNTIME_ANON and LIBRARY_PAGES
# too, the RAM-cap sweep's budgets, measured to fit, were refused.
START_ANON = 64 * 2**20
LIBRARY_PAGES = 40 * 2**20
# Buffers and temporaries that grow with the model's widths, beyond RUNTIME_ANON: decode buffers,
# and prefill's per-chunk activations (n_batch tokens of [hidden]-wide rows and their wider
# intermediates), which glibc keeps for reuse (runtime.base.system.keep_freed_memory).
# Measured on a synth file at the real widths (hidden 4096), anonymous memory from load to after
# warm-up and a 1000-token prompt: +68 MiB at n_batch 64, +168 MiB at 512; this gives 88 and 200
# MiB with RUNTIME_ANON. At the miniatures' hidden 256 it adds 3 MiB.
ACTIVATION_BYTES_PER_WIDTH = 64  # per token of the prefill chunk and unit of hidden width
WIDTH_BYTES = 8 * 2**10  # per unit of hidden width, whatever the chunk
# The tokenizer (the vocabulary's Python lists and the tokenizers library's BPE tables): measured
# 95 MiB for the real model's 128,896 tokens. The loader builds it before it reads the memory
# limits, so that it is part of what they see; `plan`, which reads the header only, counts this.
TOKENIZER_BYTES_PER_TOKEN = 800
# Reader threads: the queue depth the disk sees. Measured on the synth file (runtime.bench.streaming
# prints the curve): a virtio disk capped near 2.5 GB/s reaches it with 1-2 reads of 8 MB in
# flight, but needs 4 of one expert matrix's 3 MB; more threads only add contention.
READ_WORKERS = 4


def kv_cache_bytes(cfg: ModelConfig, n_ctx: int, rollback: int, held: int | None = None,
                   kv_types: tuple[str, str] = ("f32", "f32"), mtp_heads: int = 0) -> int:
    """The KV cache of a model loaded for n_ctx positions, holding `held` of them (all by default):
    keys and values per trunk block at their types' bytes per element (KV_TYPE_BYTES: f32 4,
    f16 2, q8_0 34/32); a sliding block's ring keeps min(W, n_ctx) + rollback positions from the
    start, a full block grows with what it holds (runtime.model.kv_cache). `mtp_heads`: the MTP
    heads that draft, whose caches grow with the positions as a full block's do (runtime.model.mtp:
    uncounted, they were 3 x 4 KiB a position on the real model, 3 GiB at 256K; a review)."""
    ring = ring_window(cfg.window, n_ctx) + rollback
    full = n_ctx if held is None else held
    per_element = sum(KV_TYPE_BYTES[check_kv_type(t)] for t in kv_types)  # a key's and a value's
    return int(sum(per_element * (ring if cfg.sliding[i] else full) * cfg.n_head_kv[i] * cfg.head_dim
                   for i in range(cfg.n_layers))
               + sum(per_element * full * cfg.n_head_kv[cfg.n_layers + j] * cfg.head_dim for j in range(mtp_heads)))


def kv_types_text(kv_types: tuple[str, str]) -> str:
    k, v = kv_types
    return k if k == v else f"K {k}, V {v}"


@dataclass(frozen=True)
class RuntimeNeeds:
    """The runtime's own memory that a limit must hold beside the weights and the expert cache,
    less what the limit keeps back already (the host's reserve for the OS covers it; a cgroup's
    or RLIMIT_AS's limit does not)."""
    start: int  # to start without being OOM-killed: anonymous memory, the KV cache as it starts
    full: int  # to run a full context without thrashing: also library pages, the KV cache at n_ctx
    n_ctx: int
    kv_bytes: int = 0  # the KV cache at n_ctx
    kv_types: tuple[str, str] = ("f32", "f32")
    kept: int = 0  # a server's kept KV caches (RuntimeOptions.prompt_cache), in `full`


def activation_bytes(cfg: ModelConfig, n_batch: int) -> int:
    """A prefill chunk's activations and the decode buffers, which glibc keeps for reuse."""
    return cfg.hidden * (n_batch * ACTIVATION_BYTES_PER_WIDTH + WIDTH_BYTES)


def own_bytes(cfg: ModelConfig, n_batch: int, tokenizer_built: bool) -> int:
    """The runtime's anonymous memory beside the weights, the expert cache and the KV cache."""
    return RUNTIME_ANON + activation_bytes(cfg, n_batch) + (0 if tokenizer_built else cfg.vocab * TOKENIZER_BYTES_PER_TOKEN)


def runtime_needs(cfg: ModelConfig, n_ctx: int, rollback: int, limit: MemoryLimit,
                  kv_types: tuple[str, str] = ("f32", "f32"), n_batch: int = 64,
                  tokenizer_built: bool = False, mtp_heads: int = 0, kept: int = 0) -> RuntimeNeeds:
    """kv_types: the load options' (cache_type_k, cache_type_v) (RuntimeOptions.kv_types); n_batch:
    the prefill chunk; tokenizer_built: the process holds the tokenizer already (the loader's case);
    mtp_heads: the MTP heads that may draft (their KV caches count with the trunk's, and the hidden
    states kept for them, runtime.model.mtp.held_state_bytes, beside); kept: a server's kept KV
    caches (RuntimeOptions.prompt_cache), which grow as the KV cache does."""
    kv = kv_cache_bytes(cfg, n_ctx, rollback, kv_types=kv_types, mtp_heads=mtp_heads)
    own = own_bytes(cfg, n_batch, tokenizer_built)
    at_start = START_ANON + activation_bytes(cfg, n_batch) + (0 if tokenizer_built else cfg.vocab * TOKENIZER_BYTES_PER_TOKEN)
    # The host's reserve covers the runtime's own memory, never the KV cache: at a long context it
    # can be many GiB (12 GiB for the real model at 256K in f16), which would leave the OS nothing.
    start = max(0, at_start - limit.reserve) + kv_cache_bytes(cfg, n_ctx, rollback, held=min(n_ctx, START_CAPACITY),
                                                              kv_types=kv_types)
    full = max(0, own + LIBRARY_PAGES - limit.reserve) + kv + held_state_bytes(cfg, n_ctx, mtp_heads) + kept
    return RuntimeNeeds(start, full, n_ctx, kv, tuple(kv_types), kept)


def _map_trunk(weights, n_trunk: int, skip: tuple[str, ...], on_matrix):
    """The weights tree with each distinct matrix replaced by on_matrix(matrix); (tree, bytes of the
    matrices and plain arrays visited). Top-level fields in `skip` and the blocks past `n_trunk`
    are left as they are. A matrix shared by several parts (a tied head) is visited once."""
    done: dict[int, Matrix] = {}
    total = 0

    def walk(node):
        nonlocal total
        if isinstance(node, Matrix):
            if id(node) not in done:
                total += node.data.nbytes
                done[id(node)] = on_matrix(node)
            return done[id(node)]
        if isinstance(node, list):
            return [walk(v) for v in node]
        if dataclasses.is_dataclass(node):
            return dataclasses.replace(node, **{f.name: walk(getattr(node, f.name)) for f in dataclasses.fields(node)})
        if isinstance(node, np.ndarray):
            total += node.nbytes
        return node

    top = {f.name: (getattr(weights, f.name) if f.name in skip else walk(getattr(weights, f.name)))
           for f in dataclasses.fields(weights) if f.name != "blocks"}
    top["blocks"] = [walk(b) for b in weights.blocks[:n_trunk]] + list(weights.blocks[n_trunk:])
    return dataclasses.replace(weights, **top), total


SKIP = ("embed", "nextn")  # embedding rows are read on demand; MTP heads unused by plain decoding


def resident_size(weights, n_trunk: int, skip: tuple[str, ...] = SKIP) -> int:
    """The bytes make_resident would copy, counted without copying."""
    return _map_trunk(weights, n_trunk, skip, lambda m: m)[1]


def make_resident(weights, n_trunk: int, skip: tuple[str, ...] = SKIP):
    """A copy of the weights tree whose matrices live in RAM instead of the file map; (tree, bytes).

    Top-level fields named in `skip` stay mapped, and so do the MTP blocks (blocks past
    `n_trunk`): plain decoding never touches them.
    """
    # np.array copies; the kernels' packed view is rebuilt over the copy
    return _map_trunk(weights, n_trunk, skip, lambda m: make_matrix(m.name, m.qtype, m.shape, np.array(m.data)))


def choose_budget(src: str, asked: int | None, usable: int, limit: MemoryLimit, resident: int,
                  runtime: RuntimeNeeds, slot: int, min_slots: int, all_experts: int,
                  fit: bool = False) -> tuple[int, str]:
    """The expert cache's size and why: (bytes, the reason in words).

    The default leaves room for a full context; an asked-for budget is taken when the model
    can start with it (with `fit`, cut to the largest that can). Raises when it cannot start:
    the resident weights, the runtime and the cache (asked for, or the smallest useful one)
    exceed what the tightest limit leaves.
    """
    start_room = usable - resident - runtime.start  # for the expert cache, at start
    smallest = min_slots * slot
    if asked is None:
        if start_room < smallest:
            raise StepstreamError(
                f"{src}: streaming needs {size_text(resident + runtime.start + smallest)} "
                f"({size_text(resident)} of resident weights, {size_text(smallest)} for the smallest expert cache: "
                f"{min_slots} experts" + (f", {size_text(runtime.start)} for the runtime" if runtime.start else "")
                + f") but the {limit.text()} leaves {size_text(usable)}")
        room = usable - resident - runtime.full
        if room < smallest:  # it would start, and be OOM-killed (or thrash) as the context fills
            raise StepstreamError(
                f"{src}: a full context of {runtime.n_ctx} positions needs "
                f"{size_text(resident + runtime.full + smallest)} ({size_text(resident)} of resident weights, "
                f"{size_text(runtime.kv_bytes)} of KV cache ({kv_types_text(runtime.kv_types)}), "
                f"{size_text(smallest)} for the smallest expert cache: {min_slots} experts"
                + (f", {size_text(runtime.kept)} for other conversations' caches (--cache-ram)" if runtime.kept else "")
                + (f", {size_text(runtime.full - runtime.kv_bytes - runtime.kept)} for the runtime"
                   if runtime.full > runtime.kv_bytes + runtime.kept else "") + f") but the {limit.text()} leaves "
                f"{size_text(usable)}: use a smaller -c, a smaller KV type (-ctk/-ctv q8_0)"
                + (", a smaller --cache-ram" if runtime.kept else "") + ", or more memory")
        return min(room, all_experts), limit.text()
    need = resident + runtime.start + min(asked, all_experts)
    full_room = usable - resident - runtime.full
    if need > usable and fit and start_room >= smallest:
        _warn_past_full_context(src, start_room, full_room, runtime)
        return start_room, f"asked for {size_text(asked)}, cut to what the {limit.text()} leaves"
    if need > usable:
        fit = (f"the largest budget that fits is {size_text(start_room)} to start, "
               f"{size_text(max(0, full_room))} with a full context of {runtime.n_ctx} positions"
               if start_room >= smallest
               else f"not even the smallest expert cache ({min_slots} experts, {size_text(smallest)}) fits")
        whole = f" (a cache of every expert, {size_text(all_experts)})" if asked > all_experts else ""
        raise StepstreamError(f"{src}: a RAM budget of {size_text(asked)}{whole} needs {size_text(need)} with "
                              f"{size_text(resident)} of resident weights and {size_text(runtime.start)} for the "
                              f"runtime, but the {limit.text()} leaves {size_text(usable)}; {fit}")
    _warn_past_full_context(src, min(asked, all_experts), full_room, runtime)
    return asked, f"asked for; {limit.text()}"


def _warn_past_full_context(src: str, budget: int, full_room: int, runtime: RuntimeNeeds) -> None:
    """A budget that starts but leaves no room for a full context is taken (asked for, or cut to
    what starts), with a warning: a long prompt may then be killed for memory (a review)."""
    if budget > full_room:
        warnings.warn(f"{src}: a RAM budget of {size_text(budget)} starts, but leaves no room for a full context of "
                      f"{runtime.n_ctx} positions ({size_text(runtime.kv_bytes)} of KV cache): the largest budget "
                      f"that does is {size_text(max(0, full_room))}; a long prompt may be killed for memory "
                      f"(a smaller --ram-budget or -c avoids it)", UserWarning, stacklevel=3)


@dataclass(frozen=True)
class Placement:
    resident_bytes: int  # non-expert weights copied to RAM
    cache_bytes: int  # the expert cache's arena
    slot_bytes: int
    cache_slots: int
    pinned: int
    n_experts: int
    expert_bytes: int  # all routed experts in the file
    policy: str
    budget_bytes: int = 0  # the RAM budget the cache was cut from
    budget_reason: str = ""  # which memory limit decided it, or that it was asked for
    kv_bytes: int = 0  # the KV cache with a full context (RuntimeNeeds.kv_bytes)
    kv_types: tuple[str, str] = ("f32", "f32")
    n_ctx: int = 0
    filled: int = 0  # experts read into the cache at load (fill_cache)

    def text(self) -> str:
        kv = (f"KV cache {self.kv_bytes / 2**20:.1f} MiB at {self.n_ctx} positions ({kv_types_text(self.kv_types)}); "
              if self.n_ctx else "")
        return (f"placement: budget {size_text(self.budget_bytes)} ({self.budget_reason}); "
                f"{self.resident_bytes / 2**20:.1f} MiB resident (attention, shared experts, dense, head); {kv}"
                f"expert cache {self.cache_bytes / 2**20:.1f} MiB = {self.cache_slots} of {self.n_experts} experts "
                # the share of the experts it holds: its bytes include each slot's O_DIRECT alignment, so
                # bytes over bytes read 111% for a cache of all of them
                f"({self.cache_slots / max(self.n_experts, 1):.0%} of the experts' {self.expert_bytes / 2**20:.1f} MiB), "
                f"policy {self.policy}"
                + (f", {self.pinned} pinned from the profile" if self.pinned else "")
                + (f", {self.filled} read at load" if self.filled else ""))

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def fill_keys(table: ExpertTable, slots: int, held: set) -> list[tuple[int, int]]:
    """Up to `slots` experts not in `held` to read at load: dealt to the MoE layers in turn, each
    layer's lowest free ids first (with no profile, any experts serve a router as well as any
    others), so every layer gets the same number where it has them; in file order (layer, id)."""
    free = {l: [(l, e) for e in range(table.layers[l].n_expert) if (l, e) not in held] for l in sorted(table.layers)}
    keys: list[tuple[int, int]] = []
    for rank in range(max((len(v) for v in free.values()), default=0)):
        for layer_keys in free.values():
            if len(keys) == slots:
                return sorted(keys)
            if rank < len(layer_keys):
                keys.append(layer_keys[rank])
    return sorted(keys)


def build_streaming(f: GGUFModelFile, cfg: ModelConfig, weights, budget: int | str | None, limit: MemoryLimit,
                    usable: int, runtime: RuntimeNeeds, policy: str = "lru", profile: str | None = None,
                    pin_share: float = 0.5, direct_io: bool = True, workers: int = READ_WORKERS,
                    fill: bool = False, fit: bool = False):
    """(weights with the non-expert part copied to RAM, provider, placement), after checking that
    they fit in `usable` bytes, what the tightest memory limit `limit` leaves. `fill`: read
    experts into every free slot before returning (fill_keys), so decoding starts warm."""
    table: ExpertTable = build_expert_table(f, cfg)
    slot = slot_bytes_for(table)
    n_experts = sum(l.n_expert for l in table.layers.values())
    # Prefetch the 3/4 most likely of one token's K experts: the last guesses are the ones
    # most often wrong, and each wrong guess is an expert read for nothing.
    depth = max(1, cfg.n_expert_used * 3 // 4)
    budget_bytes, reason = choose_budget(
        f.path.name, None if budget is None else parse_bytes(budget), usable, limit,
        resident_size(weights, cfg.n_layers), runtime, slot,
        # the smallest useful cache: one token's experts in one layer, and the next layer's read-ahead
        cfg.n_expert_used + depth, slot * n_experts, fit)
    if budget_bytes < slot * cfg.n_expert_used:  # an asked budget (the default is at least the smallest cache)
        raise StepstreamError(f"{f.path.name}: a RAM budget (--ram-budget) of {size_text(budget_bytes)} holds "
                              f"{budget_bytes // slot} experts of {slot / 2**20:.2f} MiB; at least {cfg.n_expert_used} "
                              f"are needed (one token's experts in one layer): "
                              f"{size_text(slot * cfg.n_expert_used)} or more")
    with f.evaluating():  # a writer waits for the copy (a file cut short under it: SIGBUS)...
        weights, resident = make_resident(weights, cfg.n_layers)
    f.check_unchanged()  # ...and one that got the file meanwhile stops the load in one line
    f.release_pages()  # the copy read the file through its map
    if profile is not None and policy == "lru":
        policy = "pinned"
    # Keep no more slots than there are experts: a larger budget buys nothing.
    cache = ExpertCache(min(budget_bytes, slot * n_experts), slot, policy, min_slots=cfg.n_expert_used)
    provider = StreamingExperts(table, cache, DirectReader(direct_io, held=f.held_descriptors()), workers=workers,
                                prefetch_depth=depth)
    pinned = filled = 0
    try:
        if profile is not None:
            hot = ExpertProfile.load(profile, f.path).hottest(int(cache.n_slots * pin_share), table)
            pinned = provider.pin(hot)
        if fill:
            filled = provider.fill(fill_keys(table, cache.n_slots - pinned, set(cache.index)))
    except BaseException:
        provider.close()
        raise
    placement = Placement(resident, cache.capacity_bytes, slot, cache.n_slots, pinned, n_experts,
                          table.total_bytes, cache.policy, budget_bytes, reason, runtime.kv_bytes, runtime.kv_types,
                          runtime.n_ctx, filled)
    return weights, provider, placement
