"""Generate text while routed experts stream from disk into a RAM budget.

    python examples/run_with_ram_budget.py MODEL.gguf [--budget 30%|800MiB] [--prompt TEXT] [-n 48]

Prints where the model lives (resident weights, expert cache), the text, the time to the
first token (the prompt's evaluation) and the decode speed after it, as `stepstream run
--stats` reports them (after a warm-up, so a first run's kernel compile is not timed), and
the cache's hit rate, bytes read and stall time. -n -1 generates until the end of the text
or of the context. OpenMP waits passively when other processes hold the cores, as in
`stepstream run`.
"""

import argparse
import sys
import time

import runtime
from runtime.base.errors import StepstreamError
from runtime.base.system import choose_wait_policy
from runtime.cli import SubcommandParser
from runtime.cli.common import GenerationTiming
from runtime.cli.arg_types import budget_arg, token_limit

p = SubcommandParser(description=__doc__.splitlines()[0])
p.add_argument("model")
p.add_argument("--budget", default="30%", help="the expert cache: a size (800MiB) or a share of the experts' bytes "
                                              "(30%%) (default: 30%%)")
p.add_argument("--prompt", default="def fibonacci(n):", help="the prompt (default: %(default)r)")
p.add_argument("-n", type=token_limit, default=48, help="tokens to generate; -1: until the end (default: 48)")
a = p.parse_args()

choose_wait_policy(None)  # before the first kernel starts OpenMP's threads, which read the policy once
try:
    if a.budget.endswith("%"):  # a share of all routed experts
        from offload.expert_table import build_expert_table

        share = float(a.budget[:-1]) if a.budget[:-1].replace(".", "", 1).isdigit() else -1.0
        if not 0 < share <= 100:
            p.error(f"--budget {a.budget}: a share must be above 0% and at most 100%")
        probe = runtime.load(a.model)
        budget = int(build_expert_table(probe.file, probe.cfg).total_bytes * share / 100)
        probe.close()
    else:
        try:  # a size with its unit, as `stepstream run --ram-budget` takes it (a bare 30 is refused)
            budget = budget_arg(a.budget)
        except argparse.ArgumentTypeError as e:
            p.error(f"--budget {a.budget}: {e}")
    model = runtime.load(a.model, ram_budget=budget)
    print(model.placement.text())
    model.warm_up()
    ids = model.tokenize(a.prompt)
    out, first = [], None
    t0 = time.perf_counter()
    for tok in model.generate(ids, max_tokens=None if a.n < 0 else a.n, temperature=0.0):
        out.append(tok)
        if first is None:  # the prompt's evaluation ends here: the decode speed counts what follows
            first = time.perf_counter()
    end = time.perf_counter()
    timing = GenerationTiming(len(ids), t0, end if first is None else first, 1, end, len(out))
except StepstreamError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
print(a.prompt + model.detokenize(out).decode("utf-8", "replace"))
print(timing.speeds())
print(model.provider.stats.text())
model.close()
