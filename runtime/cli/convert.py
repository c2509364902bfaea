"""`stepstream convert HF_DIR OUT.gguf [--type TYPE] [--force] [--resume] [--threads N]`."""

from __future__ import annotations

import argparse
import json
import os
import signal
import threading
from pathlib import Path

from convert import policy
from runtime.base.errors import raise_terminated


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("hf_dir", help="Hugging Face checkpoint directory (config.json, *.safetensors, tokenizer.json): "
                                 "bf16, or FP8 with block scales (Step-3.5-Flash-FP8)")
    p.add_argument("out", help="output .gguf path (written atomically: a temporary file, then a rename); "
                              "an existing file is an error unless --force")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted conversion of the same checkpoint with the same options (its "
                        ".OUT.PID.part and progress record), to the bytes an uninterrupted run writes; and keep "
                        "this run's partial file if it is interrupted (Ctrl-C, SIGTERM; a killed run's is kept anyway)")
    p.add_argument("--threads", type=int, default=None, help="quantizer threads (default: every core)")
    p.add_argument("--type", dest="ftype", default=policy.DEFAULT_TYPE, choices=policy.TYPES, type=str.lower,
                   help="output format (default q4_k_m: routed experts Q4_K, other matrices Q6_K, norms/router F32); "
                        "q2_k, q3_k_s, q3_k_m, q3_k_l, q4_k_s, q5_k_m and q6_k are llama.cpp's presets of those names, "
                        "with its per-tensor rules (convert/policy.py); any case (Q4_K_M)")
    p.add_argument("--tokenizer-pre", default=None,
                   help="llama.cpp pre-tokenizer name, when the split regex in tokenizer.json is not recognised")
    p.add_argument("--name", default=None, help="general.name (default: the checkpoint directory's name)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--summary-json", default=None, help="also write the summary as JSON to this path (an existing "
                                                         "file is an error unless --force)")



def check_summary_path(summary: Path, out: Path, hf_dir: Path, force: bool) -> None:
    """The summary JSON may not be the GGUF being written nor a checkpoint file, and replaces an
    existing file only with --force, as the GGUF does."""
    from convert.output_file import check_output
    from runtime.base.errors import StepstreamError

    if os.path.abspath(summary.resolve()) == os.path.abspath(out.resolve()):
        raise StepstreamError(f"--summary-json {summary}: is the output GGUF; give the summary another file name")
    check_output(summary, force, hf_dir if hf_dir.is_dir() else None, "summary JSON")


def run(args: argparse.Namespace) -> int:
    from convert.converter import convert
    from runtime.base.system import choose_wait_policy
    from runtime.cli.text_args import writable_output, write_text_atomically

    choose_wait_policy(args.threads)  # passive OpenMP waits when other processes hold the cores
    if args.summary_json:  # checked now, not after the conversion
        check_summary_path(Path(args.summary_json), Path(args.out), Path(args.hf_dir), args.force)
        writable_output(Path(args.summary_json), "summary JSON")

    main_thread = threading.current_thread() is threading.main_thread()  # signal handlers live there only
    previous = signal.signal(signal.SIGTERM, raise_terminated) if main_thread else None
    try:
        summary = convert(args.hf_dir, args.out, args.ftype, tokenizer_pre=args.tokenizer_pre,
                          progress=not args.no_progress, name=args.name, force=args.force, resume=args.resume,
                          threads=args.threads)
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
    print(summary.text())
    if args.summary_json:
        write_text_atomically(Path(args.summary_json), json.dumps(summary.as_dict(), indent=2), "summary JSON")
    return 0
