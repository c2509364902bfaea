"""Generate text while routed experts stream from disk into a RAM budget.

    python examples/run_with_ram_budget.py MODEL.gguf [--budget 800MiB] [--prompt TEXT]

Prints where the model lives (resident weights, expert cache), the text, and the cache's
hit rate, bytes read and stall time.
"""

import argparse
import time

import runtime

p = argparse.ArgumentParser()
p.add_argument("model")
p.add_argument("--budget", default="30%", help="bytes (800MiB) or a share of the experts' bytes (30%%)")
p.add_argument("--prompt", default="def fibonacci(n):")
p.add_argument("-n", type=int, default=48)
a = p.parse_args()

budget = a.budget
if budget.endswith("%"):  # a share of all routed experts
    from offload.expert_table import build_expert_table

    probe = runtime.load(a.model)
    budget = int(build_expert_table(probe.file, probe.cfg).total_bytes * float(budget[:-1]) / 100)
    probe.close()
model = runtime.load(a.model, ram_budget=budget)
print(model.placement.text())
ids = model.tokenize(a.prompt)
t0 = time.perf_counter()
out = list(model.generate(ids, max_tokens=a.n, temperature=0.0))
dt = time.perf_counter() - t0
print(a.prompt + model.detokenize(out).decode("utf-8", "replace"))
print(f"{len(out) / dt:.1f} tok/s")
print(model.provider.stats.text())
model.close()
