"""`stepstream mini OUT_DIR --preset NAME [--seed N]`."""

from __future__ import annotations

import argparse
import time

from convert.mini import PRESETS, write_mini


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("out_dir", help="directory to create (must not exist or be empty)")
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS),
                   help="; ".join(f"{k}: {v.about}" for k, v in PRESETS.items()))
    p.add_argument("--seed", type=int, default=0, help="weight seed (default 0)")


def run(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    out = write_mini(args.out_dir, args.preset, args.seed, progress=True)
    size = sum(f.stat().st_size for f in out.iterdir())
    print(f"wrote {out} ({size / 1e6:.1f} MB, preset {args.preset}, seed {args.seed}) in {time.perf_counter() - t0:.1f} s")
    return 0
