"""`stepstream train-mini OUT_DIR [--steps N --seed S --threads T]` (needs the [train] extra)."""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from runtime.base.errors import StepstreamError
from runtime.cli.arg_types import non_negative_int, positive_float, positive_int


def add_arguments(p: argparse.ArgumentParser) -> None:
    from convert.train.options import TrainOptions  # not the trainer: --help works without PyTorch

    d = TrainOptions()
    p.add_argument("out_dir", help="directory for the HF checkpoint, in an existing directory (must not exist or be "
                                   "empty)")
    p.add_argument("--steps", type=positive_int, default=d.steps, help=f"optimizer steps (default: {d.steps})")
    p.add_argument("--batch", type=positive_int, default=d.batch, help=f"sequences per step (default: {d.batch})")
    p.add_argument("--seq", type=positive_int, default=d.seq, help=f"tokens per sequence (default: {d.seq})")
    p.add_argument("--lr", type=positive_float, default=d.lr, help=f"peak learning rate (default: {d.lr})")
    p.add_argument("--seed", type=non_negative_int, default=d.seed, help=f"seed (default: {d.seed})")
    p.add_argument("--threads", type=positive_int, default=d.threads, help=f"torch threads (default: {d.threads})")


def check_out_dir(out: Path) -> None:
    """Refuse, before minutes of training, an OUT_DIR the trained checkpoint could not be renamed to.

    The trainer writes OUT_DIR.part beside it, so a directory is really made there and removed:
    os.access says yes to root where nothing can be made (/proc)."""
    if out.exists() and not out.is_dir():
        raise StepstreamError(f"{out} exists and is not a directory; give a new directory")
    if out.is_dir() and any(out.iterdir()):
        raise StepstreamError(f"{out}: directory exists and is not empty")
    if not out.parent.is_dir():
        raise StepstreamError(f"{out}: cannot write the checkpoint: the directory {out.parent} does not exist")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".probe", dir=out.parent))
    except OSError as e:
        raise StepstreamError(f"{out}: cannot write the checkpoint: cannot create a directory in "
                              f"{out.parent.absolute()} ({e.strerror})") from None


def run(args: argparse.Namespace) -> int:
    check_out_dir(Path(args.out_dir))
    try:
        from convert.train.options import TrainOptions
        from convert.train.trainer import train
    except ImportError as e:
        raise StepstreamError(f"training needs PyTorch: pip install -e '.[train]' ({e})") from None
    opts = TrainOptions(steps=args.steps, batch=args.batch, seq=args.seq, lr=args.lr, seed=args.seed, threads=args.threads)
    report, _ = train(args.out_dir, opts)
    print(f"wrote {args.out_dir}: held-out perplexity {report['heldout_perplexity']:.2f} "
          f"(unigram {report['unigram_perplexity']:.1f}) in {report['minutes']:.1f} min")
    return 0
