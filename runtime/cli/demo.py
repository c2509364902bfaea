"""`stepstream demo`: the embedded trained miniature, with its routed experts streaming from disk.

The model ships inside the package (runtime/data/): a Step-3.5 with every feature of the
real one (sliding/full attention, MoE with a shared expert, MTP heads), trained on the
Python standard library. The expert cache gets a share of the experts' bytes, so experts
really are read from disk as the router asks for them.
"""

from __future__ import annotations

import sys
import time
from importlib import resources

from runtime.base.errors import StepstreamError

MODEL = "step35-mini-q4_k_m.gguf"
PROMPT = "def read_config(path):\n    \"\"\"Read a JSON config file and return it as a dict.\"\"\"\n"


def model_path():
    path = resources.files("runtime") / "data" / MODEL
    if not path.is_file():
        raise StepstreamError(f"the embedded model {MODEL} is missing from {path.parent}; reinstall stepstream")
    return path


def add_arguments(p) -> None:
    p.add_argument("-p", "--prompt", default=PROMPT, help="prompt (default: the start of a Python function)")
    p.add_argument("-n", "--n-predict", type=int, default=96, help="tokens to generate (default: 96)")
    p.add_argument("--budget-share", type=float, default=0.5,
                   help="expert cache as a share of all routed experts' bytes (default: 0.5)")
    p.add_argument("--temp", type=float, default=0.0, help="temperature; 0 = greedy (default: 0)")
    p.add_argument("-t", "--threads", type=int, default=None, help="compute threads")


def run(args) -> int:
    from offload.expert_table import build_expert_table
    from runtime.base.gguf_file import GGUFModelFile
    from runtime.base.config import ModelConfig
    from runtime.base.system import peak_rss_bytes
    from runtime.cli.common import report_warm_up
    from runtime.loader import load

    if not 0 < args.budget_share <= 1:
        raise StepstreamError(f"--budget-share must be in (0, 1], got {args.budget_share}")
    path = model_path()
    f = GGUFModelFile(path)
    expert_bytes = build_expert_table(f, ModelConfig.from_gguf(f)).total_bytes
    model = load(path, ram_budget=int(expert_bytes * args.budget_share), n_threads=args.threads, n_ctx=1024)
    print(model.placement.text(), file=sys.stderr)
    report_warm_up(model)
    st = model.provider.stats
    hits0, misses0, read0 = st.hits, st.misses, st.bytes_read  # the figures below leave the warm-up out
    ids = model.tokenize(args.prompt, special=True)
    sys.stdout.write(args.prompt)
    sys.stdout.flush()
    from runtime.generation import complete, sampling_params

    t0 = time.perf_counter()
    first = None
    n = 0
    for piece in complete(model, ids, sampling_params(temperature=args.temp, seed=0), args.n_predict, []):
        first = first or time.perf_counter()
        sys.stdout.write(piece.text)
        sys.stdout.flush()
        n = piece.n_tokens
    t1 = time.perf_counter()
    hits, misses = st.hits - hits0, st.misses - misses0
    print(f"\n\nprompt of {len(ids)} tokens and first token: {first - t0:.2f} s; "
          f"then {max(n - 1, 0) / max(t1 - first, 1e-9):.1f} tok/s over {n - 1} tokens; "
          f"peak RSS {peak_rss_bytes() / 2**20:.0f} MiB; expert cache hit rate {hits / max(hits + misses, 1):.1%}, "
          f"{(st.bytes_read - read0) / 1e6:.1f} MB read from disk", file=sys.stderr)
    model.close()
    return 0
