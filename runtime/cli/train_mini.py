"""`stepstream train-mini OUT_DIR [--steps N --seed S --threads T]` (needs the [train] extra)."""

from __future__ import annotations

import argparse

from runtime.base.errors import StepstreamError
from runtime.cli.common import non_negative_int, positive_float, positive_int


def add_arguments(p: argparse.ArgumentParser) -> None:
    from convert.train.trainer import TrainOptions

    d = TrainOptions()
    p.add_argument("out_dir", help="directory for the HF checkpoint (must not exist or be empty)")
    p.add_argument("--steps", type=positive_int, default=d.steps, help=f"optimizer steps (default: {d.steps})")
    p.add_argument("--batch", type=positive_int, default=d.batch, help=f"sequences per step (default: {d.batch})")
    p.add_argument("--seq", type=positive_int, default=d.seq, help=f"tokens per sequence (default: {d.seq})")
    p.add_argument("--lr", type=positive_float, default=d.lr, help=f"peak learning rate (default: {d.lr})")
    p.add_argument("--seed", type=non_negative_int, default=d.seed, help=f"seed (default: {d.seed})")
    p.add_argument("--threads", type=positive_int, default=d.threads, help=f"torch threads (default: {d.threads})")


def run(args: argparse.Namespace) -> int:
    try:
        from convert.train.trainer import TrainOptions, train
    except ImportError as e:
        raise StepstreamError(f"training needs PyTorch: pip install -e '.[train]' ({e})") from None
    opts = TrainOptions(steps=args.steps, batch=args.batch, seq=args.seq, lr=args.lr, seed=args.seed, threads=args.threads)
    report, _ = train(args.out_dir, opts)
    print(f"wrote {args.out_dir}: held-out perplexity {report['heldout_perplexity']:.2f} "
          f"(unigram {report['unigram_perplexity']:.1f}) in {report['minutes']:.1f} min")
    return 0
