"""The trunk on the GPU, a chunk of tokens at a time, with routed experts split between VRAM and the CPU.

Per block, on the card (quant.cuda_kernels for the quantized products, runtime.model.gpu.ops
for the rest), all launched on one stream, for T tokens at once (T = 1: decode):
    x = norm(h);  q|k|v|gate = x @ Wqkvg (one launch);  q, k = rope(norm(q, k));  store k, v
    h += (attention(q, cache) * sigmoid(gate)) @ Wo;  x = norm(h)
    dense block:  h += ffn(x), token by token
    MoE block:    ids, weights = route(router @ x)
        every expert in VRAM: each token's descriptor rows are picked on the card and one fused
            SwiGLU launch adds the shared expert and its K experts into h: nothing waits for the host
        otherwise: ids, weights and x come to the host (one copy and one wait per block); per
            token, the experts in VRAM and the misses chosen for copying run in one fused launch,
            the other misses run on the CPU's int8 kernel while the card works; the CPU's sums
            cross the bus once per block and are added into h
Which misses are copied is the VRAM tier's measured cost model (`tier`, offload.vram_experts).

A chunk stores its keys before it attends, so on sliding blocks it must fit the ring's spare
slots (runtime.model.kv_cache.fits_in_place): `chunk` tokens at most.

Shape legend:  T tokens in the chunk  H hidden  P = (Nh + 2 Nk) D + Nh projections
               E experts  K experts per token  L trunk blocks
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType as Q
from numba import cuda
from quant import cuda_kernels as ck
from quant import int8_kernels

from runtime.base.config import ModelConfig
from runtime.base.errors import StepstreamError
from runtime.model.experts import ExpertProvider
from runtime.model.gpu import ops
from runtime.model.gpu.expert_desc import gather_ffn_rows
from runtime.model.gpu.kv import DeviceKVCache
from runtime.model.gpu.layout import aligned, gpu_matrices, resident_layout, word_aligned
from runtime.model.kv_cache import START_CAPACITY
from runtime.model.matrix import Matrix
from runtime.model.ops import rope_inv_freq
from runtime.model.weights import FFN, ModelWeights


@dataclass
class GPUBlock:
    """One trunk block's device data (descriptors index the arena)."""
    attn_norm: object
    ffn_norm: object
    q_norm: object
    k_norm: object
    inv_freq: object  # float64 [R/2]
    qkvg: object  # int64 [4, 4]
    qkvg_starts: object  # int64 [5]
    p: int
    o: object  # int64 [1, 4]
    o_starts: object
    ffn3: np.ndarray  # int64 [1, 3, 4] host: the dense FFN or the shared expert
    ffn3_d: object
    n_head: int
    n_kv: int
    window: int
    limit: float  # routed experts' clamp
    limit_shared: float
    router_f32: object = None  # float32 [E, H] on the card; None when quantized (router, router_starts)
    router: object = None
    router_starts: object = None
    bias: object = None  # float32 [E] or [0]

    @property
    def moe(self) -> bool:
        return self.router_f32 is not None or self.router is not None


class GPUExecutor:
    def __init__(self, cfg: ModelConfig, weights: ModelWeights, provider: ExpertProvider, tier, slots: int,
                 slot_bytes: int, n_experts: int, n_ctx: int, rollback: int, int8: int, chunk: int):
        """tier: offload.vram_experts.VRAMExperts with `slots` slots of slot_bytes; n_experts: the
        routed experts of the file; int8: the model's int8 format set (for the CPU's misses);
        chunk: the most tokens one step takes."""
        self.cfg, self.provider, self.tier, self.int8 = cfg, provider, tier, int8
        self.n_experts, self.chunk = n_experts, chunk
        self.stream = cuda.stream()
        layout = resident_layout(weights, cfg)
        self.slot_base, self.slot_bytes, self.n_slots = aligned(layout.matrix_bytes), slot_bytes, slots
        self.arena = cuda.device_array(self.slot_base + slots * slot_bytes, np.uint8)
        for _, m in gpu_matrices(weights, cfg):
            off = layout.offsets[id(m)]
            self.arena[off : off + m.nbytes].copy_to_device(_bytes(m))
        self._offsets = layout.offsets
        self.blocks = [self._block(i, b, weights.rope_factors) for i, b in enumerate(weights.blocks[: cfg.n_layers])]
        self.out_norm = cuda.to_device(weights.out_norm)
        self.head = cuda.to_device(self._desc(weights.output)[None])
        self.head_starts = cuda.to_device(np.array([0, cfg.vocab], np.int64))
        self.cache = DeviceKVCache(cfg.n_head_kv[: cfg.n_layers], cfg.head_dim, cfg.sliding[: cfg.n_layers],
                                   cfg.window, n_ctx, rollback, START_CAPACITY)
        self._experts_desc: dict[tuple[int, int], np.ndarray] = {}  # (layer, e) -> [3, 4], valid while resident
        self.tables = None  # layer -> int64 [E, 3, 4] on the card, once every expert is in VRAM
        self._cuts: dict = {}  # slices of the buffers below (see _cut)
        self._buffers(n_ctx)

    # ------------------------------------------------------------------ building

    def _desc(self, m: Matrix) -> np.ndarray:
        return ck.descriptor(self._offsets[id(m)], int(m.qtype), m.shape[0], m.shape[1])

    def _block(self, i: int, b, rope_factors) -> GPUBlock:
        cfg = self.cfg
        sliding = cfg.sliding[i]
        inv = rope_inv_freq(cfg.n_rot[i], cfg.rope_base_sliding if sliding else cfg.rope_base_full,
                            None if sliding else rope_factors)
        qkvg = [b.q, b.k, b.v, b.gate]
        ffn = b.dense if b.router is None else b.shared
        ffn3 = np.stack([self._desc(ffn.gate), self._desc(ffn.up), self._desc(ffn.down)])[None]
        g = GPUBlock(
            cuda.to_device(b.attn_norm), cuda.to_device(b.ffn_norm), cuda.to_device(b.q_norm), cuda.to_device(b.k_norm),
            cuda.to_device(inv), cuda.to_device(np.stack([self._desc(m) for m in qkvg])),
            cuda.to_device(np.cumsum([0] + [m.shape[0] for m in qkvg]).astype(np.int64)),
            sum(m.shape[0] for m in qkvg), cuda.to_device(self._desc(b.o)[None]),
            cuda.to_device(np.array([0, b.o.shape[0]], np.int64)), ffn3, cuda.to_device(ffn3),
            cfg.n_head[i], cfg.n_head_kv[i], cfg.window if sliding else 0,
            cfg.swiglu_limit[i], cfg.swiglu_limit_shared[i])
        if b.router is not None:
            if b.router.qtype == Q.F32:
                g.router_f32 = cuda.to_device(np.ascontiguousarray(b.router.data, np.float32))
            else:
                g.router = cuda.to_device(self._desc(b.router)[None])
                g.router_starts = cuda.to_device(np.array([0, cfg.n_expert], np.int64))
            g.bias = cuda.to_device(b.router_bias if b.router_bias is not None else np.zeros(0, np.float32))
        return g

    def _buffers(self, n_ctx: int) -> None:
        cfg, L, T = self.cfg, self.cfg.n_layers, self.chunk
        H, K, E, D = cfg.hidden, cfg.n_expert_used, max(cfg.n_expert, 1), cfg.head_dim
        dev, pin = cuda.device_array, cuda.pinned_array
        self.h, self.x, self.o = dev((T, H), np.float32), dev((T, H), np.float32), dev((T, H), np.float32)
        self.q8 = {}  # width -> (xq, xd), [T, ...]
        self.proj = {b.p: dev((T, b.p), np.float32) for b in self.blocks}
        self.att = {b.n_head: dev((T, b.n_head * D), np.float32) for b in self.blocks}
        self.n_head_max = max(b.n_head for b in self.blocks)
        self.att_slots = min(n_ctx, START_CAPACITY) + self.cache.window + 64  # the ring's window: at most n_ctx
        self.att_scratch = ops.attention_scratch(T, self.n_head_max, self.att_slots)
        self.logits, self.ids, self.wts = dev((T, E), np.float32), dev((T, K), np.int32), dev((T, K), np.float32)
        self.ids_h, self.wts_h = pin((T, K), np.int32), pin((T, K), np.float32)
        self.x_h, self.y_h = pin((T, H), np.float32), pin((T, H), np.float32)
        self.pos_h, self.pos_d = pin(T, np.int64), dev(T, np.int64)
        self.slots_h, self.slots_d = pin((L, T), np.int64), dev((L, T), np.int64)
        self.desc_h, self.desc_d = pin((T, 1 + K, 3, 4), np.int64), dev((T, 1 + K, 3, 4), np.int64)
        self.fw_h, self.fw_d = pin((T, 1 + K), np.float32), dev((T, 1 + K), np.float32)
        self.fl_h, self.fl_d = pin((T, 1 + K), np.float32), dev((T, 1 + K), np.float32)
        self.one_d = cuda.to_device(np.ones(1, np.float32))
        self.limit_d = {b.limit_shared: cuda.to_device(np.array([b.limit_shared], np.float32)) for b in self.blocks}
        width = max(cfg.dense_ffn, cfg.shared_ffn, cfg.expert_ffn)
        self.ffn_scratch = ck.ffn_scratch(1 + K, width)  # the widest FFN: rows past an FFN's width are skipped
        self.staging = [pin(self.slot_bytes, np.uint8) for _ in range(K)] if self.n_slots else []
        self.cpu_scratch = int8_kernels.ffn_scratch(H, K, K * cfg.expert_ffn) if cfg.n_expert else None

    def _cut(self, a, start: int, one: int = 0):
        """a[:start] (one = 0), a[start:start + 1] (one = 1) or a[start] (one = 2), made once: numba builds a new device-array
        object for every slice, and a decode step takes dozens of them."""
        key = (id(a), start, one)
        v = self._cuts.get(key)
        if v is None:
            v = self._cuts[key] = a[start] if one == 2 else a[start : start + 1] if one else a[:start]
        return v

    def _acts(self, width: int):
        if width not in self.q8:
            T = self.chunk
            self.q8[width] = (cuda.device_array((T, width), np.int8), cuda.device_array((T, width // 256), np.float32))
        return self.q8[width]

    # ------------------------------------------------------------------ experts in VRAM

    def _slot_desc(self, ffn: FFN, slot: int) -> np.ndarray:
        """[3, 4] descriptors of an expert placed in `slot` (gate, up, down, each on a word)."""
        base, rows = self.slot_base + slot * self.slot_bytes, []
        for m in (ffn.gate, ffn.up, ffn.down):
            rows.append(ck.descriptor(base, int(m.qtype), m.shape[0], m.shape[1]))
            base += word_aligned(m.nbytes)
        return np.stack(rows)

    def _copy_in(self, ffn: FFN, slot: int, staging) -> None:
        """Start copying an expert into its slot (through pinned staging, on the stream)."""
        at = 0
        for m in (ffn.gate, ffn.up, ffn.down):
            if at + m.nbytes > self.slot_bytes:
                raise StepstreamError(f"expert {ffn.gate.name} is larger than a VRAM slot ({self.slot_bytes} bytes)")
            staging[at : at + m.nbytes] = _bytes(m)
            at += word_aligned(m.nbytes)
        base = self.slot_base + slot * self.slot_bytes
        self.arena[base : base + at].copy_to_device(staging[:at], stream=self.stream)

    def preload(self, keys) -> int:
        """Copy experts (layer, e) into VRAM now, while slots remain; how many were copied. When
        that is every expert, MoE blocks pick their rows on the card from then on."""
        n = 0
        by_layer: dict[int, list[int]] = {}
        for layer, e in keys:
            by_layer.setdefault(layer, []).append(e)
        for layer, ids in by_layer.items():
            for e, ffn in self.provider.experts(layer, ids):
                if n >= self.n_slots:
                    return n
                slot = self.tier.assign(layer, e, set())
                self._copy_in(ffn, slot, self.staging[0])
                self.stream.synchronize()  # the staging buffer is reused
                self._experts_desc[(layer, e)] = self._slot_desc(ffn, slot)
                n += 1
        if n == self.n_experts:
            E = self.cfg.n_expert
            self.tables = {layer: cuda.to_device(np.stack([self._experts_desc[(layer, e)] for e in range(E)]))
                           for layer in by_layer}
        return n

    def calibrate(self, layer: int) -> None:
        """Measure the miss split's two costs on this machine: pinned host-to-device bytes per
        second, and one expert of `layer` on the CPU's int8 kernel (median of 5, after a warm-up)."""
        if not self.staging or self.n_slots >= self.n_experts:
            return
        st, buf = self.stream, self.staging[0]
        dst = cuda.device_array(buf.shape[0], np.uint8)
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            dst.copy_to_device(buf, stream=st)
            st.synchronize()
            times.append(time.perf_counter() - t0)
        self.tier.cost.copy_seconds_per_byte = float(np.median(times)) / buf.shape[0]
        self.x_h[0] = np.random.default_rng(0).standard_normal(self.cfg.hidden).astype(np.float32)
        for e, ffn in self.provider.experts(layer, [0]):
            times = []
            for _ in range(6):
                t0 = time.perf_counter()
                self._cpu_ffn([(e, ffn)], {e: 1.0}, 0.0, 0)
                times.append(time.perf_counter() - t0)
            self.tier.cost.cpu_seconds_per_expert = float(np.median(times[1:]))

    # ------------------------------------------------------------------ a step

    def run(self, rows: np.ndarray, pos0: int) -> np.ndarray:
        """Tokens with embedding rows [T, H] (T <= chunk) at positions pos0..; their hidden states
        [T, H] after the last trunk block (host)."""
        T, st = rows.shape[0], self.stream
        if not 1 <= T <= self.chunk:
            raise ValueError(f"a GPU step takes 1..{self.chunk} tokens, got {T}")
        for i, kv in enumerate(self.cache.layers):
            for t in range(T):
                slot = kv.reserve(pos0 + t)
                kv.pos[slot] = pos0 + t
                self.slots_h[i, t] = slot
            if kv.capacity > self.att_slots:
                self.att_slots = 2 * kv.capacity
                self.att_scratch = ops.attention_scratch(self.chunk, self.n_head_max, self.att_slots)
        self.pos_h[:T] = np.arange(pos0, pos0 + T)
        self.pos_d.copy_to_device(self.pos_h, stream=st)
        self.slots_d.copy_to_device(self.slots_h, stream=st)
        self._cut(self.h, T).copy_to_device(np.ascontiguousarray(rows, np.float32), stream=st)
        for i, (b, kv) in enumerate(zip(self.blocks, self.cache.layers)):
            kv.sync_positions(st)
            self._attention(b, kv, i, T)
            if b.moe:
                self._moe(i, b, T)
            else:
                xq, xd = self._acts(self.cfg.hidden)
                ck.quantize(self._cut(self.x, T), self._cut(xq, T), self._cut(xd, T), st)
                for t in range(T):
                    ck.swiglu_ffns(self.arena, b.ffn3_d, self.one_d, self.limit_d[b.limit_shared], self._cut(xq, t, 1),
                                   self._cut(xd, t, 1), self._cut(self.h, t, 2), self.ffn_scratch, st)
        out = self._cut(self.h, T).copy_to_host(stream=st)
        st.synchronize()
        return out

    def _attention(self, b: GPUBlock, kv, i: int, T: int) -> None:
        """h += attention(norm(h)); then x = norm(h) for the FFN."""
        st, cfg = self.stream, self.cfg
        D, H = cfg.head_dim, cfg.hidden
        xq, xd = self._acts(H)
        ops.rms_norm(self._cut(self.h, T), b.attn_norm, cfg.rms_eps, self._cut(self.x, T), st)
        ck.quantize(self._cut(self.x, T), self._cut(xq, T), self._cut(xd, T), st)
        proj, pos = self._cut(self.proj[b.p], T), self._cut(self.pos_d, T)
        ck.matvec(self.arena, b.qkvg, b.qkvg_starts, self._cut(xq, T), self._cut(xd, T), proj, st)
        ops.qk_norm_rope(proj, b.n_head, b.n_kv, D, b.q_norm, b.k_norm, cfg.rms_eps, b.inv_freq, pos, st)
        ops.kv_store(proj, b.n_head, b.n_kv, D, kv.k, kv.v, kv.dpos, self.slots_d[i, :T], pos, st)
        att = self._cut(self.att[b.n_head], T)
        ops.attention(proj, b.n_head, b.n_kv, D, kv.k, kv.v, kv.dpos, kv.capacity if kv.ring else kv.n, pos,
                      b.window, att, self.att_scratch, st)
        aq, ad = self._acts(b.n_head * D)
        ck.quantize(att, self._cut(aq, T), self._cut(ad, T), st)
        ck.matvec(self.arena, b.o, b.o_starts, self._cut(aq, T), self._cut(ad, T), self._cut(self.o, T), st)
        ops.add_rms_norm(self._cut(self.h, T), self._cut(self.o, T), b.ffn_norm, cfg.rms_eps, self._cut(self.x, T), st)

    def _moe(self, i: int, b: GPUBlock, T: int) -> None:
        st, cfg = self.stream, self.cfg
        K = cfg.n_expert_used
        xq, xd = self._acts(cfg.hidden)
        ck.quantize(self._cut(self.x, T), self._cut(xq, T), self._cut(xd, T), st)
        if b.router_f32 is not None:
            ops.router_logits(self._cut(self.x, T), b.router_f32, self._cut(self.logits, T), st)
        else:
            ck.matvec(self.arena, b.router, b.router_starts, self._cut(xq, T), self._cut(xd, T), self._cut(self.logits, T), st)
        ops.route(self._cut(self.logits, T), b.bias, K, cfg.expert_scale, cfg.expert_norm, self._cut(self.ids, T), self._cut(self.wts, T), st)
        if self.tables is not None:  # every expert in VRAM: nothing waits for the host
            for t in range(T):
                gather_ffn_rows(self._cut(self.ids, t, 1), self._cut(self.wts, t, 1), self.tables[i], b.ffn3_d, b.limit_shared,
                                b.limit, self._cut(self.desc_d, t, 2), self._cut(self.fw_d, t, 2), self._cut(self.fl_d, t, 2), st)
                ck.swiglu_ffns(self.arena, self._cut(self.desc_d, t, 2), self._cut(self.fw_d, t, 2), self._cut(self.fl_d, t, 2), self._cut(xq, t, 1), self._cut(xd, t, 1),
                               self._cut(self.h, t, 2), self.ffn_scratch, st)
            self.tier.counts.gpu_hits += T * K
            return
        self._cut(self.ids, T).copy_to_host(self._cut(self.ids_h, T), stream=st)
        self._cut(self.wts, T).copy_to_host(self._cut(self.wts_h, T), stream=st)
        self._cut(self.x, T).copy_to_host(self._cut(self.x_h, T), stream=st)
        st.synchronize()  # also: the previous block's copies out of staging and y_h are done
        self.y_h[:T] = 0.0
        keep: set[int] = set()  # slots this block's launches read: not to be evicted before they run
        staged = [0]
        on_cpu = False
        for t in range(T):
            on_cpu |= self._moe_token(i, b, t, keep, staged, (self._cut(xq, t, 1), self._cut(xd, t, 1)))
        if on_cpu:
            self._cut(self.o, T).copy_to_device(self._cut(self.y_h, T), stream=st)
            ops.add(self._cut(self.h, T), self._cut(self.o, T), st)

    def _moe_token(self, i: int, b: GPUBlock, t: int, keep: set, staged: list, q8) -> bool:
        """Token t's routed experts of block i: VRAM hits and copies on the card, the rest into y_h[t]
        on the CPU. Whether any ran on the CPU."""
        tier = self.tier
        ids = [int(e) for e in self.ids_h[t]]
        w = {e: float(self.wts_h[t, k]) for k, e in enumerate(ids)}
        slots = tier.lookup(i, ids)
        keep.update(s for s in slots if s is not None)
        gpu = [(e, self._experts_desc[(i, e)]) for e, s in zip(ids, slots) if s is not None]
        misses = [e for e, s in zip(ids, slots) if s is None]
        if not misses:
            self._gpu_ffn(b, t, gpu, w, q8)
            return False
        copy, _ = tier.split(i, misses, self.slot_bytes, len(keep), most=len(self.staging) - staged[0])
        cpu_rows = []
        with self.provider.held(i, misses) as got:
            for e, ffn in (got if got is not None else self.provider.experts(i, misses)):
                if e in copy:
                    s = tier.assign(i, e, keep)
                    keep.add(s)
                    try:
                        self._copy_in(ffn, s, self.staging[staged[0]])
                    except BaseException:
                        tier.forget(i, e)
                        raise
                    staged[0] += 1
                    self._experts_desc[(i, e)] = self._slot_desc(ffn, s)
                    gpu.append((e, self._experts_desc[(i, e)]))
                elif got is not None:
                    cpu_rows.append((e, ffn))
                else:  # streamed one at a time: compute it before its RAM slot is reused
                    self._cpu_ffn([(e, ffn)], w, b.limit, t)
            self._gpu_ffn(b, t, sorted(gpu), w, q8)  # launched: the card works while the CPU does
            self._cpu_ffn(cpu_rows, w, b.limit, t)
        return True

    def _gpu_ffn(self, b: GPUBlock, t: int, experts, w, q8) -> None:
        """h[t] += shared(x[t]) + its VRAM experts: one fused launch."""
        n = 1 + len(experts)
        self.desc_h[t, 0] = b.ffn3[0]
        self.fw_h[t, 0], self.fl_h[t, 0] = 1.0, b.limit_shared
        for k, (e, d) in enumerate(experts, start=1):
            self.desc_h[t, k], self.fw_h[t, k], self.fl_h[t, k] = d, w[e], b.limit
        st = self.stream
        self.desc_d[t, :n].copy_to_device(self.desc_h[t, :n], stream=st)
        self.fw_d[t, :n].copy_to_device(self.fw_h[t, :n], stream=st)
        self.fl_d[t, :n].copy_to_device(self.fl_h[t, :n], stream=st)
        ck.swiglu_ffns(self.arena, self.desc_d[t, :n], self.fw_d[t, :n], self.fl_d[t, :n], *q8, self._cut(self.h, t, 2),
                       self.ffn_scratch, st)

    def _cpu_ffn(self, rows, w, limit: float, t: int) -> None:
        """y_h[t] += the experts in `rows` of x_h[t], on the CPU's int8 kernel."""
        if not rows:
            return
        desc = np.stack([f.descriptor for _, f in rows])
        weights = np.array([w[e] for e, _ in rows], np.float32)
        limits = np.full(len(rows), limit, np.float32)
        int8_kernels.swiglu_ffns(desc, weights, limits, self.x_h[t], self.y_h[t], self.cpu_scratch, self.int8)

    # ------------------------------------------------------------------ output

    def output(self, h: np.ndarray) -> np.ndarray:
        """Logits [T, V] float32 of hidden states h [T, H] (host), any T."""
        cfg, st = self.cfg, self.stream
        t = h.shape[0]
        hd = cuda.to_device(np.ascontiguousarray(h, np.float32), stream=st)
        x = cuda.device_array((t, cfg.hidden), np.float32)
        ops.rms_norm(hd, self.out_norm, cfg.rms_eps, x, st)
        xq, xd = cuda.device_array((t, cfg.hidden), np.int8), cuda.device_array((t, cfg.hidden // 256), np.float32)
        ck.quantize(x, xq, xd, st)
        logits = cuda.device_array((t, cfg.vocab), np.float32)
        ck.matvec(self.arena, self.head, self.head_starts, xq, xd, logits, st)
        out = logits.copy_to_host(stream=st)
        st.synchronize()
        return out


def _bytes(m: Matrix) -> np.ndarray:
    return np.ascontiguousarray(m.data).view(np.uint8).reshape(-1)
