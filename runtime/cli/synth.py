"""`stepstream synth`: a random-weight Step-3.5 GGUF at any width (default: the real model's).

Benchmarks need the real model's shapes, not its weights: this writes quantized random blocks
directly (runtime.bench.synth), at disk speed, with no checkpoint and no conversion.
Like `convert`, it writes a temporary file and renames it, never overwrites OUT without --force,
and removes the temporary file a killed run left behind.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path

from runtime.base.errors import raise_terminated
from runtime.cli.arg_types import non_negative_float, non_negative_int, positive_float, positive_int
from runtime.cli.text_args import writable_output


def add_arguments(p) -> None:
    p.add_argument("out", type=Path, help="the GGUF file to write (written atomically: a temporary file, then a "
                                          "rename); an existing file is an error unless --force")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.add_argument("--moe-layers", type=positive_int, default=3, help="MoE layers (default: 3; the real model has 42; with --dense-layers at most its 45)")
    p.add_argument("--dense-layers", type=non_negative_int, default=1, help="leading dense layers (default: 1; real: 3)")
    p.add_argument("--hidden", type=positive_int, default=4096, help="hidden size, a multiple of 256 (default: 4096)")
    p.add_argument("--heads", type=positive_int, default=64, help="query heads of full-attention layers (default: 64)")
    p.add_argument("--heads-sliding", type=positive_int, default=96, help="query heads of sliding layers (default: 96)")
    p.add_argument("--kv-heads", type=positive_int, default=8, help="KV heads (default: 8)")
    p.add_argument("--window", type=positive_int, default=512, help="sliding window (default: 512)")
    p.add_argument("--experts", type=positive_int, default=288, help="routed experts per MoE layer (default: 288)")
    p.add_argument("--top-k", type=positive_int, default=8, help="experts used per token (default: 8)")
    p.add_argument("--expert-ffn", type=positive_int, default=1280, help="expert FFN width (default: 1280)")
    p.add_argument("--shared-ffn", type=positive_int, default=1280, help="shared expert FFN width (default: 1280)")
    p.add_argument("--dense-ffn", type=positive_int, default=11264, help="dense FFN width (default: 11264)")
    p.add_argument("--vocab", type=positive_int, default=128896, help="vocabulary size (default: 128896)")
    p.add_argument("--type", dest="qtype", choices=["q4_k", "q8_0", "q6_k"], default="q4_k",
                   help="format of the matrices (default: q4_k; the output head is always q6_k)")
    p.add_argument("--router-scale", type=positive_float, default=1.0, help="std of the router logits (default: 1)")
    p.add_argument("--bias-skew", type=non_negative_float, default=0.0, help="std of the router bias (default: 0)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="random seed (default: 0)")
    p.add_argument("--mtp", type=non_negative_int, default=0,
                   help="MTP heads after the trunk, 0-3 (default: 0; the real model has 3): random heads, whose "
                        "drafts are rarely accepted, to time drafting and verify passes at the real widths")
    p.add_argument("--quiet", action="store_true", help="no progress bar")



def run(args) -> int:
    from runtime.bench.synth import synth_timed

    out = writable_output(args.out, "synthetic model")
    main_thread = threading.current_thread() is threading.main_thread()  # signal handlers live there only
    previous = signal.signal(signal.SIGTERM, raise_terminated) if main_thread else None
    try:
        path, nbytes, seconds = synth_timed(
            out, moe_layers=args.moe_layers, dense_layers=args.dense_layers, hidden=args.hidden, n_head_full=args.heads,
            n_head_sliding=args.heads_sliding, n_kv=args.kv_heads, window=args.window, n_expert=args.experts,
            top_k=args.top_k, expert_ffn=args.expert_ffn, shared_ffn=args.shared_ffn, dense_ffn=args.dense_ffn,
            vocab=args.vocab, qtype=args.qtype, router_scale=args.router_scale, bias_skew=args.bias_skew,
            seed=args.seed, progress=not args.quiet, force=args.force, mtp=args.mtp)
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
    print(f"{path}: {nbytes:,} bytes in {seconds:.1f} s ({nbytes / 1e6 / max(seconds, 1e-9):.0f} MB/s)")
    return 0
