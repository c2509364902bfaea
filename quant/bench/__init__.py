"""Benchmark of the dequant-matmul kernels against the machine's read bandwidth.

    python -m quant.bench [--formats Q4_K,Q5_K,Q6_K,Q8_0] [--sets experts,attention] [--threads N] [--reps 9]

Weight sets (each larger than the caches, so every call streams from DRAM):
    experts    E routed experts x (gate [1280, 4096], up [1280, 4096], down [4096, 1280])
    attention  L layers x (q [8192, 4096], k [1024, 4096], v [1024, 4096], o [4096, 8192])
For each kernel it times one pass over the whole set (median of --reps passes)
and prints the weight bytes streamed per second, the read bandwidth of a large
numpy reduction measured in the same run, and their ratio. GEMM rows also give
their time relative to the one-token GEMV on the same weights: float32 GEMMs
against the float32 GEMV, int8-activation ("q8") GEMMs against the q8 GEMV, which is what
decode runs; the "GEMM q8" rows time the GEMM prefill runs (on AVX-512 VNNI hosts, 16 GGUF
rows at a time, see quant.int8_kernels.avx512_vnni). The bracketed
cpu-time rate divides the bytes by the CPU seconds per thread: on a machine
other processes share it shows what the kernel does when its threads run.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import time

import numba
import numpy as np
from gguf import GGMLQuantizationType as T

from .. import PackedMatrix, pack, quantize
from .. import float_kernels as kernels
from .. import int8_kernels as q8kernels

EXPERT_SHAPES = [(1280, 4096), (1280, 4096), (4096, 1280)]             # gate, up, down
ATTENTION_SHAPES = [(8192, 4096), (1024, 4096), (1024, 4096), (4096, 8192)]  # q, k, v, o (full layer)
MIN_SET_BYTES = 100 * 2**20


def read_bandwidth(nbytes: int = 512 * 2**20, reps: int = 5) -> float:
    """Bytes per second of np.sum over a float64 buffer far larger than the caches (median)."""
    buf = np.ones(nbytes // 8, np.float64)
    buf.sum()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        buf.sum()
        times.append(time.perf_counter() - t)
    return nbytes / float(np.median(times))


# formats this project reads but does not write: their rows are random bytes, with the f16
# fields (bytes per block, weights per block, field offsets) set to a moderate scale; IQ1_M's d
# is the top nibbles of its four u16 scales (bytes 48 .. 56)
RANDOM_FIELDS = {T.Q2_K: (84, 256, (80, 82)), T.Q3_K: (110, 256, (108,)), T.IQ4_NL: (18, 32, (0,)),
                 T.IQ4_XS: (136, 256, (0,)), T.IQ2_XXS: (66, 256, (0,)), T.IQ2_XS: (74, 256, (0,)),
                 T.IQ2_S: (82, 256, (0,)), T.IQ3_XXS: (98, 256, (0,)), T.IQ3_S: (110, 256, (0,)),
                 T.IQ1_S: (50, 256, (0,)), T.IQ1_M: (56, 256, ())}
_SCALE = np.float16(0.01)


def _random_rows(qtype, rows: int, cols: int, rng) -> np.ndarray:
    nbytes, per, fields = RANDOM_FIELDS[qtype]
    raw = rng.integers(0, 256, (rows, cols // per, nbytes), dtype=np.uint8)
    for off in fields:
        raw[:, :, off:off + 2] = np.full((rows, cols // per), _SCALE, np.float16).view(np.uint8).reshape(rows, -1, 2)
    if qtype == T.IQ1_M:
        sc = raw[:, :, 48:56].copy().view(np.uint16) & np.uint16(0x0FFF)
        d = int(_SCALE.view(np.uint16))
        for i in range(4):
            sc[:, :, i] |= np.uint16(((d >> 4 * i) & 15) << 12)
        raw[:, :, 48:56] = sc.view(np.uint8)
    return raw.reshape(rows, -1)


def make_set(qtype, shapes, copies: int, seed: int = 0) -> list[PackedMatrix]:
    """copies x shapes distinct matrices. Rows are quantized once per shape (in blocks of at most
    1024 rows) and copied, which keeps setup fast; speed does not depend on the values. Formats
    without a quantizer here (RANDOM_FIELDS) get random codes."""
    rng = np.random.default_rng(seed)
    protos = {}
    for rows, cols in set(shapes):
        part = math.gcd(rows, 1024)
        if qtype in RANDOM_FIELDS:
            q = _random_rows(qtype, part, cols, rng)
        else:
            q = quantize((0.02 * rng.standard_normal((part, cols))).astype(np.float32), qtype)
        protos[rows, cols] = np.concatenate([q] * (rows // part), axis=0)
    return [pack(qtype, protos[s].copy(), *s) for _ in range(copies) for s in shapes]


def time_pass(fn, mats, reps: int) -> tuple[float, float]:
    """Median wall seconds and median CPU seconds (all threads) of one pass of fn over the set."""
    fn(mats[0])  # compile or load from cache
    wall, cpu = [], []
    for _ in range(reps):
        t, c = time.perf_counter(), time.process_time()
        for m in mats:
            fn(m)
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return float(np.median(wall)), float(np.median(cpu))


def bench_set(name, mats, reps, bw, tokens=(4, 8)):
    rng = np.random.default_rng(1)
    total = sum(m.nbytes for m in mats)
    cols = {m.cols for m in mats}
    rows = {m.rows for m in mats}
    xs = {c: rng.standard_normal(c).astype(np.float32) for c in cols}
    outs = {r: np.empty(r, np.float32) for r in rows}
    threads = numba.get_num_threads()
    t1, c1 = time_pass(lambda m: kernels.matvec(m, xs[m.cols], outs[m.rows]), mats, reps)
    qname = mats[0].qtype.name
    lines = [(f"{qname:6s} {name:9s} GEMV n=1", t1, c1, None)]
    scratch = kernels.make_scratch()
    for n in tokens:
        Xs = {c: rng.standard_normal((n, c)).astype(np.float32) for c in cols}
        Os = {r: np.empty((n, r), np.float32) for r in rows}
        tn, cn = time_pass(lambda m: kernels.matmul(m, Xs[m.cols], Os[m.rows], scratch), mats, reps)
        lines.append((f"{qname:6s} {name:9s} GEMM n={n}", tn, cn, tn / t1))
    if all(q8kernels.supports(m.qtype, m.cols) for m in mats):
        # int8 activations (quantized once, before the timed passes: the runtime quantizes a layer's input
        # once for all the matrices that read it), times relative to the int8 GEMV, the fastest one-token kernel
        acts = {c: q8kernels.quantize_activations(xs[c]) for c in cols}
        q1, qc1 = time_pass(lambda m: q8kernels.matvec(m, acts[m.cols], outs[m.rows]), mats, reps)
        lines.append((f"{qname:6s} {name:9s} GEMV q8 n=1", q1, qc1, None))
        if mats[0].qtype in q8kernels.GEMM_FORMATS:
            for n in tokens:
                As = {c: q8kernels.quantize_activations(rng.standard_normal((n, c)).astype(np.float32)) for c in cols}
                Os = {r: np.empty((n, r), np.float32) for r in rows}
                tn, cn = time_pass(lambda m: q8kernels.matmul(m, As[m.cols], Os[m.rows]), mats, reps)
                lines.append((f"{qname:6s} {name:9s} GEMM q8 n={n}", tn, cn, tn / q1))
    for label, wall, cpu, rel in lines:
        rate = total / wall
        extra = f"   {rel:5.2f}x GEMV time" if rel is not None else ""
        # bytes per second of CPU time per thread: the rate the kernel would reach if its
        # threads had the cores to themselves (differs from the wall rate on a busy machine)
        print(f"{label:28s} {total / 2**20:7.0f} MiB  {rate / 1e9:6.2f} GB/s  "
              f"read {bw / 1e9:6.2f} GB/s  ratio {rate / bw:5.2f}{extra}  "
              f"[cpu-time rate {total / (cpu / threads) / 1e9:6.2f} GB/s]", flush=True)


SETS = ("experts", "attention")


def _check(ap: argparse.ArgumentParser, args) -> None:
    """Options that would end in a traceback or time nothing are refused, with usage (status 2)."""
    from quant.codec import quantizable

    benchable = [t for t in T if t in RANDOM_FIELDS or t in quantizable()]
    if not 1 <= args.threads <= numba.config.NUMBA_NUM_THREADS:
        ap.error(f"--threads {args.threads}: choose 1..{numba.config.NUMBA_NUM_THREADS} (the cores numba may use)")
    for name in ("reps", "experts", "layers"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} {getattr(args, name)}: must be at least 1")
    args.set_names = [x.strip() for x in args.sets.split(",") if x.strip()]
    if not args.set_names or any(x not in SETS for x in args.set_names):
        ap.error(f"--sets {args.sets!r}: choose among {', '.join(SETS)}")
    args.qtypes = []
    for name in (x.strip() for x in args.formats.split(",")):
        qtype = T.__members__.get(name.upper())
        if qtype not in benchable:
            known = ", ".join(t.name for t in benchable)
            ap.error(f"--formats: {name!r} is no GGUF tensor type with kernels here (a tensor type such as "
                     f"Q4_K, not a file type such as Q4_K_M); choose among {known}")
        args.qtypes.append(qtype)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m quant.bench", description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--formats", default="Q4_K,Q5_K,Q6_K,Q8_0",
                    help="comma-separated GGUF types (those of the official Q4_K_S file)")
    ap.add_argument("--threads", type=int, default=numba.config.NUMBA_NUM_THREADS, help="compute threads")
    ap.add_argument("--experts", type=int, default=12, help="experts in the expert set (3 matrices each)")
    ap.add_argument("--layers", type=int, default=3, help="attention layers in the attention set")
    ap.add_argument("--reps", type=int, default=9, help="timed passes per kernel (the median is shown)")
    ap.add_argument("--sets", default="experts,attention", help="weight sets to time (experts, attention)")
    args = ap.parse_args(argv)
    _check(ap, args)
    # OpenMP workers that spin while waiting steal the core their partner needs whenever another
    # process is running; sleeping workers cost a few microseconds per call on an idle machine
    # and keep the figures meaningful on a busy one. Read by libgomp at its first use, below.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    numba.set_num_threads(args.threads)
    print(f"quant.bench: {platform.processor() or platform.machine()}, numba {numba.__version__}, "
          f"{args.threads} threads (threading layer {numba.config.THREADING_LAYER}, "
          f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}), median of {args.reps} passes", flush=True)
    bw_before = read_bandwidth()
    print(f"read bandwidth (np.sum over 512 MiB float64): {bw_before / 1e9:.2f} GB/s", flush=True)
    results_bw = [bw_before]
    for qtype in args.qtypes:
        fname = qtype.name
        for name, shapes, copies in (("experts", EXPERT_SHAPES, args.experts),
                                     ("attention", ATTENTION_SHAPES, args.layers)):
            if name not in args.set_names:
                continue
            mats = make_set(qtype, shapes, copies)
            size = sum(m.nbytes for m in mats)
            if size < MIN_SET_BYTES:
                raise SystemExit(f"{fname} {name} set is {size / 2**20:.0f} MiB; raise --experts/--layers "
                                 f"to exceed {MIN_SET_BYTES // 2**20} MiB")
            bw = read_bandwidth()
            results_bw.append(bw)
            bench_set(name, mats, args.reps, bw)
            del mats
    print(f"read bandwidth over the run: median {np.median(results_bw) / 1e9:.2f} GB/s "
          f"(min {min(results_bw) / 1e9:.2f}, max {max(results_bw) / 1e9:.2f})")

