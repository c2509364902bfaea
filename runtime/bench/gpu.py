"""The GPU tier's benchmark, for the lent H200: kernel bandwidth, then prefill and decode
speed on a real-width synthetic model (runtime.bench.synth) in three settings.

    python -m runtime.bench.gpu --workdir DIR [--moe-layers 3] [--tokens 32] [--prompt 64] [--json OUT.json]

a. kernels: GB/s of the quantized GEMV (quant.cuda_kernels.bench.gemv_gbps) for Q4_K, Q5_K,
   Q6_K and Q8_0 on a 128896 x 4096 matrix (the real model's output head: 300-560 MB, more
   than the card's L2, 50 MB on an H200, and a pass long against a launch), each as a
   fraction of the card's copy bandwidth (copy_gbps of 1 GiB); and the host's time to launch
   one small matvec (launch_us: a decode step makes about 60 launches).
b. model: each setting runs in its own process (memory and compiled state do not mix):
     cpu     load(path)                                   the CPU path
     gpu     load(path, gpu_budget="auto")                everything in VRAM
     gpu25   load(path, gpu_budget=vram_budget_for(...))  resident + KV + 25% of the experts
   model.warm_up() first; prefill tok/s = prompt / seconds of one model.eval(prompt ids);
   decode: 2 warm-up steps then `tokens` steps of model.eval([id]) on seeded random ids
   (teacher forced); median and mean tok/s over the steps. Ratios are setting / cpu. The GPU
   settings also give decode_host_wait_share: the part of the decode steps the host spent
   waiting for the card (near 0: the card idles while Python launches kernels).
c. time budget on the device (16 cores, H200), under 5 minutes in all: synth of 3 real-width
   MoE layers (8.5 GB) ~20 s; kernels ~10 s; cpu ~90 s at most (its decode runs at most
   --cpu-tokens steps); gpu and gpu25 ~60 s each, most of it loading and the first compile.
   Each child has a timeout (--child-timeout); one that fails or times out is reported as such.

--tiny --cpu-only runs the CPU setting on a tiny synth file: the test of this script on a
machine without a GPU.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from runtime.base.child import child_env
from runtime.bench.synth import write_synth

KERNEL_QTYPES = ("q4_k", "q5_k", "q6_k", "q8_0")
KERNEL_SHAPE = (128896, 4096)
SETTINGS = ("cpu", "gpu", "gpu25")
CHILDREN = ("kernels",) + SETTINGS
TINY = dict(moe_layers=2, dense_layers=1, hidden=256, n_head_full=2, n_head_sliding=4, n_kv=1, head_dim=128, window=16,
            n_expert=16, top_k=4, expert_ffn=256, shared_ffn=256, dense_ffn=512, vocab=512)
WARM_STEPS = 2


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m runtime.bench.gpu", description=__doc__.splitlines()[0])
    p.add_argument("--workdir", type=Path, required=True, help="where the synth model is written (kept for reuse)")
    p.add_argument("--moe-layers", type=int, default=3, help="MoE layers of the synth model (default: 3)")
    p.add_argument("--tokens", type=int, default=32, help="decode steps timed on the GPU (default: 32)")
    p.add_argument("--cpu-tokens", type=int, default=8, help="decode steps timed on the CPU (default: 8)")
    p.add_argument("--prompt", type=int, default=64, help="prompt tokens for the prefill (default: 64)")
    p.add_argument("--seed", type=int, default=0, help="seed of the token ids (default: 0)")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("--cpu-only", action="store_true", help="skip the kernels and the GPU settings")
    p.add_argument("--tiny", action="store_true", help="a tiny synth model instead of the real widths (tests)")
    p.add_argument("--child-timeout", type=int, default=150, help="seconds each setting may take (default: 150)")
    p.add_argument("--budget", type=int, default=380,
                   help="seconds the whole benchmark may take (default: 380): a child gets at most what is left, "
                        "so a device command of 600 s ends with its results written")
    p.add_argument("--child", choices=CHILDREN, help=argparse.SUPPRESS)  # internal: run one part
    p.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for name in ("moe_layers", "tokens", "cpu_tokens", "prompt", "child_timeout", "budget"):
        v = getattr(args, name)
        if v < (0 if name == "moe_layers" else 1):
            p.error(f"--{name.replace('_', '-')}={v} must be {'>= 0' if name == 'moe_layers' else 'positive'}")
    return args


# ---- a. kernels ------------------------------------------------------------------------------

def kernel_bandwidth() -> dict:
    from quant.cuda_kernels.bench import copy_gbps, gemv_gbps, launch_us  # only on the GPU machine

    card = float(copy_gbps(2 ** 30))
    out = {"copy_gbps": card, "shape": list(KERNEL_SHAPE), "launch_us": float(launch_us()), "gemv": {}}
    for q in KERNEL_QTYPES:
        r = gemv_gbps(q, *KERNEL_SHAPE)
        out["gemv"][q] = {"gbps": float(r["gbps"]), "seconds": float(r["seconds"]),
                          "fraction_of_copy": float(r["gbps"]) / card, "check_cos": r["check_cos"],
                          "check_ok": r["check_ok"]}
    return out


# ---- b. one setting, in a child process ------------------------------------------------------

def token_ids(vocab: int, n: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(0, vocab, n).tolist()


def load_options(setting: str, path: Path, n_ctx: int) -> dict:
    opts = {"n_ctx": n_ctx}
    if setting == "gpu":
        opts["gpu_budget"] = "auto"
    elif setting == "gpu25":
        from offload.gpu_placement import vram_budget_for

        opts["gpu_budget"] = int(vram_budget_for(path, expert_fraction=0.25, n_ctx=n_ctx))
    return opts


def measure(path: Path, setting: str, prompt: int, tokens: int, seed: int) -> dict:
    """Prefill and decode speed of one setting on `path`, in this process."""
    from runtime.loader import load

    n_ctx = prompt + WARM_STEPS + tokens + 8
    opts = load_options(setting, path, n_ctx)
    t0 = time.perf_counter()
    model = load(path, **opts)
    load_s = time.perf_counter() - t0
    warm_s = model.warm_up()
    ids = token_ids(model.cfg.vocab, prompt + WARM_STEPS + tokens, seed)
    model.reset()
    t0 = time.perf_counter()
    logits = model.eval(ids[:prompt])
    prefill_s = time.perf_counter() - t0
    # the prompt's last logits, which every setting computes from the same ids: compared with the
    # CPU's by the parent (a wrong card kernel would still time well)
    np.save(path.with_name(f"logits_{setting}.npy"), np.asarray(logits, np.float32).reshape(-1, model.cfg.vocab)[-1])
    steps, waits = [], []
    waited = _time_waits(model)
    for t in ids[prompt:]:
        t0 = time.perf_counter()
        w0 = waited[0]
        logits = model.eval([t])
        steps.append(time.perf_counter() - t0)
        waits.append(waited[0] - w0)
    finite = bool(np.isfinite(np.asarray(logits)).all())
    gpu = gpu_report(model)
    if model.gpu_placement is not None:  # a card that waits for the host shows a small share here
        gpu["decode_host_wait_share"] = float(np.sum(waits[WARM_STEPS:]) / np.sum(steps[WARM_STEPS:]))
    model.close()
    timed = np.asarray(steps[WARM_STEPS:])
    return {"setting": setting, "options": dict(opts), "load_s": load_s, "warm_up_s": warm_s,
            "prompt": prompt, "tokens": int(timed.size), "prefill_s": prefill_s, "prefill_tok_s": prompt / prefill_s,
            "decode_tok_s_median": float(1.0 / np.median(timed)), "decode_tok_s_mean": float(timed.size / timed.sum()),
            "finite": finite, **gpu}


def _time_waits(model) -> list:
    """[seconds] the host has spent in the GPU stream's synchronize (the rest of a step is the
    host's own work: launches, Python, the CPU's experts); [0.0] forever on the CPU path."""
    waited = [0.0]
    stream = getattr(getattr(model, "gpu", None), "stream", None)
    if stream is None:
        return waited
    sync = stream.synchronize

    def timed():
        t0 = time.perf_counter()
        sync()
        waited[0] += time.perf_counter() - t0

    stream.synchronize = timed
    return waited


def gpu_report(model) -> dict:
    """The GPU settings' VRAM plan and tier counts (warm-up, prefill and decode together); {} on the CPU path."""
    if model.gpu_placement is None:
        return {}
    return {"gpu_placement": model.gpu_placement.as_dict(), "tier_counts": model.gpu.tier.counts.as_dict()}


def run_child(args, part: str, path: Path | None = None, deadline: float | None = None) -> dict:
    """Run one part (the kernels or a setting) in a child process; its JSON result, or {"error": ...}.
    `deadline` (perf_counter): the child gets at most the time left before it."""
    tokens = args.cpu_tokens if part == "cpu" else args.tokens
    cmd = [sys.executable, "-m", "runtime.bench.gpu", "--workdir", str(args.workdir), "--child", part,
           "--prompt", str(args.prompt), "--tokens", str(tokens), "--seed", str(args.seed)]
    if path is not None:
        cmd += ["--model", str(path)]
    t0 = time.perf_counter()
    limit = args.child_timeout if deadline is None else min(args.child_timeout, deadline - t0)
    if deadline is not None and deadline - t0 < min(5, args.child_timeout):
        return {"setting": part, "error": f"{part}: not run: the benchmark's --budget of {args.budget} s is spent",
                "wall_s": 0.0}
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=limit, env=child_env())
    except subprocess.TimeoutExpired:
        return {"setting": part, "error": f"{part}: timed out after {limit:.0f} s (--child-timeout, --budget); "
                                          f"the child was killed", "wall_s": limit}
    lines = [l for l in r.stdout.splitlines() if l.startswith("{")]
    if r.returncode != 0 or not lines:
        tail = r.stderr.strip()[-2000:] or r.stdout.strip()[-2000:]
        return {"setting": part, "error": f"{part}: exit status {r.returncode}: {tail}",
                "wall_s": time.perf_counter() - t0}
    out = json.loads(lines[-1])
    out["wall_s"] = time.perf_counter() - t0
    return out


# ---- report ------------------------------------------------------------------------------------

def agreement(path: Path, settings: dict) -> dict:
    """Each GPU setting's prompt logits against the CPU setting's: cosine and the same top-1."""
    try:
        cpu = np.load(path.with_name("logits_cpu.npy")).astype(np.float64)
    except OSError:
        return {}
    out = {}
    if "error" in settings.get("cpu", {}):
        return {}
    for s, result in settings.items():
        f = path.with_name(f"logits_{s}.npy")
        if s == "cpu" or "error" in result or not f.exists():  # a setting that failed after its prefill: no verdict
            continue
        g = np.load(f).astype(np.float64)
        out[s] = {"cos": float(g @ cpu / max(np.linalg.norm(g) * np.linalg.norm(cpu), 1e-300)),
                  "same_top1": bool(int(np.argmax(g)) == int(np.argmax(cpu)))}
    return out


def ratios(results: dict) -> dict:
    cpu = results.get("cpu", {})
    out = {}
    for s in SETTINGS[1:]:
        r = results.get(s, {})
        for k in ("prefill_tok_s", "decode_tok_s_median", "decode_tok_s_mean"):
            if k in r and cpu.get(k):
                out[f"{s}/cpu {k}"] = r[k] / cpu[k]
    return out


def table(report: dict) -> str:
    lines = []
    k = report.get("kernels")
    if isinstance(k, dict) and "gemv" in k:
        lines.append(f"card copy bandwidth: {k['copy_gbps']:.0f} GB/s; one launch from the host: "
                     f"{k.get('launch_us', float('nan')):.1f} us; GEMV {k['shape'][0]} x {k['shape'][1]}:")
        for q, r in k["gemv"].items():
            check = "" if "check_cos" not in r else \
                f"  rows {'right' if r['check_ok'] else 'WRONG'} (cos {r['check_cos']:.6f} against the CPU's float64)"
            lines.append(f"  {q:6s} {r['gbps']:8.0f} GB/s  {100 * r['fraction_of_copy']:5.1f}% of copy{check}")
    elif k is not None:
        lines.append(f"kernels failed: {str(k).strip().splitlines()[-1] if str(k).strip() else k}")
    lines.append(f"{'setting':8s} {'prefill tok/s':>14s} {'decode med':>11s} {'decode mean':>12s} {'load s':>7s} "
                 f"{'warm s':>7s}  options")
    for s, r in report["settings"].items():
        if "error" in r:
            lines.append(f"{s:8s} error: {r['error'].splitlines()[-1] if r['error'] else ''}")
            continue
        lines.append(f"{s:8s} {r['prefill_tok_s']:14.1f} {r['decode_tok_s_median']:11.2f} {r['decode_tok_s_mean']:12.2f} "
                     f"{r['load_s']:7.1f} {r['warm_up_s']:7.1f}  {r['options']}")
    for s, r in report["settings"].items():
        if "gpu_placement" in r:
            g, c = r["gpu_placement"], r["tier_counts"]
            lines.append(f"  {s}: {g['slots']} of {g['n_experts']} experts in VRAM "
                         f"(budget {g['budget_bytes'] / 2**30:.1f} GiB, {g['budget_reason']}); routed experts: "
                         f"{c['gpu_hits']} VRAM hits, {c['copied']} copied, {c['cpu']} on the CPU "
                         f"(hit rate {c['vram_hit_rate']:.0%}); decode steps waiting for the card: "
                         f"{r.get('decode_host_wait_share', float('nan')):.0%}")
    for name, v in report["ratios"].items():
        lines.append(f"  {name}: {v:.2f}x")
    for s, a in report.get("agreement", {}).items():
        lines.append(f"  {s} logits against the CPU's: cos {a['cos']:.6f}, top-1 {'same' if a['same_top1'] else 'DIFFERENT'}")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child == "kernels":
        print(json.dumps(kernel_bandwidth()), flush=True)
        return 0
    if args.child:
        print(json.dumps(measure(args.model, args.child, args.prompt, args.tokens, args.seed)), flush=True)
        return 0
    start = time.perf_counter()
    deadline = start + args.budget
    args.workdir.mkdir(parents=True, exist_ok=True)
    report: dict = {"args": {k: str(v) for k, v in vars(args).items()}}

    def save() -> None:  # after every part: a command killed at its limit still leaves what was measured
        if args.json:
            args.json.write_text(json.dumps(report, indent=1))

    if not args.cpu_only:  # in a child too: the parent holds no CUDA context while the settings measure VRAM
        k = run_child(args, "kernels", deadline=deadline)
        report["kernels_s"] = k.pop("wall_s")
        report["kernels"] = k.get("error", k)  # a failure is reported; the model settings still run
        print(table({"kernels": report["kernels"], "settings": {}, "ratios": {}}), flush=True)
        print(f"[kernels: {report['kernels_s']:.1f} s]", flush=True)
        save()
    shape = TINY if args.tiny else {"moe_layers": args.moe_layers}
    name = "synth_tiny.gguf" if args.tiny else f"synth_{args.moe_layers}moe.gguf"
    path = args.workdir / name
    if not path.exists():
        t0 = time.perf_counter()
        write_synth(path, progress=False, **shape)
        report["synth_s"] = time.perf_counter() - t0
        print(f"wrote {path}: {path.stat().st_size / 1e9:.2f} GB in {report['synth_s']:.1f} s", flush=True)
    report["model"] = {"path": str(path), "bytes": path.stat().st_size, **shape}
    for s in SETTINGS:  # an earlier run's logits, kept beside the reused model, are no reference
        path.with_name(f"logits_{s}.npy").unlink(missing_ok=True)
    report["settings"] = {}
    for s in SETTINGS[:1] if args.cpu_only else SETTINGS:
        report["settings"][s] = run_child(args, s, path, deadline)
        print(f"{s}: {json.dumps(report['settings'][s])}", flush=True)
        print(f"[{s}: {report['settings'][s]['wall_s']:.1f} s]", flush=True)
        report["ratios"], report["agreement"] = ratios(report["settings"]), agreement(path, report["settings"])
        save()
    report["total_s"] = time.perf_counter() - start
    print(table(report), flush=True)
    print(f"[total: {report['total_s']:.1f} s]", flush=True)
    save()
    return 0 if all("error" not in r for r in report["settings"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
