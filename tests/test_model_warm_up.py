"""Model.warm_up readies every way through the blocks: after it, no prompt length and no decode
step needs a kernel the process has not loaded yet.

`stepstream serve` answers 200 on /health only after the warm-up. When the warm-up's chunk of
five tokens went through the few-token kernels, a first request of more than eight tokens
compiled the prefill path (the GEMM, the chunk attention, the fused experts) while the client
waited: 20-33 s on a first run after an install (a review's finding). Loading a kernel, from
Numba's cache or by compiling it, goes through a dispatcher's `_compile_for_args` the first time
a process calls it with new types; the test counts those calls in a fresh process after the
warm-up, whatever this machine's cache holds.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

_AFTER_WARM_UP = """
import json, sys
import numpy as np
import runtime
from numba.core import dispatcher
from runtime.cli.demo import model_path
from runtime.model.decode_plan import FEW_TOKENS

options = json.loads(sys.argv[1])
m = runtime.load(model_path(), n_ctx=128, **options)
m.warm_up()
loaded = []
first_call = dispatcher._DispatcherBase._compile_for_args
def recording(self, *args, **kws):
    loaded.append(self.py_func.__qualname__)
    return first_call(self, *args, **kws)
dispatcher._DispatcherBase._compile_for_args = recording
ids = np.random.default_rng(3).integers(0, m.cfg.vocab, 60).tolist()
m.eval(ids[:40])                      # a prompt: one prefill chunk
m.eval(ids[40:43])                    # a chat turn's few new tokens after the cached prefix
for t in ids[43:47]:
    m.eval([t])                       # decode steps
m.reset()
m.eval(ids[:FEW_TOKENS])              # a short prompt
m.eval(ids[FEW_TOKENS:FEW_TOKENS + 1])
assert m.n_past == FEW_TOKENS + 1
print(json.dumps(sorted(set(loaded))))
"""


@pytest.mark.parametrize("options", [{}, {"experts": "stream", "ram_budget": 4 << 20}], ids=["ram", "stream"])
def test_after_the_warm_up_no_prompt_length_loads_a_kernel(options):
    r = subprocess.run([sys.executable, "-c", _AFTER_WARM_UP, json.dumps(options)], capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got == [], f"loaded after the warm-up: {got}"


def test_timing_the_draft_lengths_while_streaming_reads_little_more_than_the_warm_up():
    """With the MTP heads drafting (--mtp auto, the command line's default) the warm-up timed
    five rounds of four pass lengths through a cache still cold: on a 1 MiB budget it read 101 MB
    where the warm-up without the timing read 14 MB (a review: 3.7 GB against 1.0 GB on a real-
    width file). Streaming, one round starts the chooser: at most 3.5x."""
    import runtime
    from runtime.cli.demo import model_path

    read = {}
    for mtp in (0, "auto"):
        m = runtime.load(model_path(), ram_budget="1MiB", n_threads=1, mtp=mtp, n_ctx=512)
        st, seen = m.provider.stats, []
        real = st.restart
        st.restart = lambda st=st, real=real, seen=seen: (seen.append(st.bytes_read), real())[1]
        m.warm_up()
        read[mtp] = seen[-1]
        assert mtp == 0 or set(m.step_seconds) >= {1, 2, 3, 4}  # the chooser still starts from measured passes
        m.close()
    assert read["auto"] <= 3.5 * read[0], read
