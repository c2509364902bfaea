"""`stepstream plan -m MODEL [--ram 64GiB] [--vram 0] [--disk-gbps 7] [--ram-gbps G] [--ctx N]
[--cache-type-k T] [--cache-type-v T] [--cache-ram SIZE|auto] [--profile P] [--json]`:
what `run` would place where, the hit rate to expect and the decode speed the roofline allows.

Only the GGUF header is read (offload.plan), so it answers for a model before it is
downloaded in full, or on a machine that could not hold it: --ram describes the machine.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from contextlib import nullcontext
from pathlib import Path

from runtime.base.errors import StepstreamError
from runtime.base.memory_limit import size_text
from runtime.cli.common import add_cache_type_args, add_hub_args
from runtime.cli.arg_types import gbps, memory_arg as size, positive_int
from runtime.cli.text_args import existing_file
from runtime.cli.serve import cache_ram


def add_arguments(p: argparse.ArgumentParser) -> None:
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("-m", "--model", type=existing_file("GGUF file"), help="GGUF model")
    source.add_argument("-hf", "-hfr", "--hf-repo", dest="plan_repo", metavar="USER/MODEL[:QUANT]",
                        help="a model on Hugging Face, planned from its headers alone (a few MB read; the model is "
                             "not fetched): the GGUF -hf would fetch")
    add_hub_args(p, dest="plan_file")
    p.add_argument("--ram", type=size, default=None, metavar="SIZE",
                   help="the machine's memory, e.g. 64GiB (default: what this machine leaves now)")
    p.add_argument("--vram", type=size, default=0, metavar="SIZE",
                   help="GPU memory; only 0 is planned for now (default: 0)")
    p.add_argument("--disk-gbps", type=gbps, default=7.0, help="disk read rate in GB/s (default: 7)")
    p.add_argument("--ram-gbps", type=gbps, default=None,
                   help="GB/s of weights decoding goes through (default: measured here with the Q4_K decode kernel)")
    p.add_argument("-c", "--ctx", "--ctx-size", type=positive_int, default=None,
                   help="context the KV cache is sized for (default: run's, the model's up to 4096)")
    p.add_argument("-b", "--batch-size", type=positive_int, default=64,
                   help="prompt tokens evaluated together, whose activations the runtime holds: run's -b "
                        "(default: 64, run's; bench's is 512)")
    add_cache_type_args(p)
    p.add_argument("--profile", default=None, metavar="P", type=existing_file("profile (.json) or routing trace (.npz)"),
                   help="expert profile (.json) or routing trace (.npz) from `stepstream profile` for the hit rate")
    p.add_argument("--cache-ram", type=cache_ram, default=0, metavar="SIZE|auto",
                   help="plan for `serve --cache-ram`: memory for other conversations' KV caches, taken from the "
                        "expert cache (default: 0, as run keeps none; serve's default is auto)")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:
    from offload.plan import make_plan

    if args.ram is not None and args.ram == 0:
        raise StepstreamError("--ram 0: give the machine's memory, e.g. 64GiB (or leave --ram out for this machine's)")
    if args.vram:
        raise StepstreamError(f"--vram {size_text(args.vram)}: plan models RAM and disk only for now; leave --vram at 0")
    with tempfile.TemporaryDirectory(prefix="stepstream-plan-") if args.plan_repo else nullcontext() as headers:
        model = args.model
        if args.plan_repo:  # the model's headers alone, in files whose data is a hole (runtime.hub)
            from runtime.hub import fetch_header

            model = fetch_header(args.plan_repo, args.plan_file, Path(headers), token=args.hf_token,
                                 say=lambda text: print(text, file=sys.stderr))
        elif args.plan_file or args.hf_token:
            flag = "--hf-file" if args.plan_file else "--hf-token"
            raise StepstreamError(f"{flag} goes with -hf (a model on Hugging Face): give -hf too")
        plan = make_plan(model, ram=args.ram, disk_gbps=args.disk_gbps, ram_gbps=args.ram_gbps, n_ctx=args.ctx,
                         profile=args.profile, cache_type_k=args.cache_type_k, cache_type_v=args.cache_type_v,
                         n_batch=args.batch_size, prompt_cache=args.cache_ram)
    print(plan.json() if args.json else plan.text())
    return 0
