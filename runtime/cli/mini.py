"""`stepstream mini OUT_DIR --preset NAME [--seed N]`."""

from __future__ import annotations

import argparse
import signal
import threading
import time
from pathlib import Path

from convert import layout
from convert.hf_config import HFConfig
from convert.mini import PRESETS, Preset, make_config
from runtime.base.errors import raise_terminated
from runtime.cli.arg_types import non_negative_int


def checkpoint_bytes(p: Preset) -> int:
    """Bytes of the tensors `mini` writes for a preset: bf16, the router bias f32.

    The vocabulary is the preset's rounded up to 64, as write_mini rounds the trained
    tokenizer's (which reaches the preset's size on the stdlib corpus)."""
    cfg = HFConfig.from_dict(make_config(p, -(-p.vocab // 64) * 64))
    return sum(s.n_elements * (4 if s.role == layout.ROUTER_BIAS else 2) for s in layout.checkpoint_layout(cfg))


def preset_help() -> str:
    return "; ".join(f"{name}: {p.n_layers} layers, hidden {p.hidden}, {p.n_expert} experts (top-{p.n_expert_used}), "
                     f"{checkpoint_bytes(p) / 1e6:.1f} MB bf16" for name, p in PRESETS.items())


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("out_dir", help="directory to create, in an existing directory (must not exist or be empty)")
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help=f"{preset_help()} (default: tiny)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="weight seed (default: 0)")


def run(args: argparse.Namespace) -> int:
    from convert.mini import write_mini

    t0 = time.perf_counter()
    main_thread = threading.current_thread() is threading.main_thread()  # signal handlers live there only
    previous = signal.signal(signal.SIGTERM, raise_terminated) if main_thread else None  # `kill` cleans up as Ctrl-C
    try:
        out = write_mini(Path(args.out_dir), args.preset, args.seed, progress=True)  # checks OUT_DIR before any work
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
    size = sum(f.stat().st_size for f in out.iterdir())
    print(f"wrote {out} ({size / 1e6:.1f} MB, preset {args.preset}, seed {args.seed}) in {time.perf_counter() - t0:.1f} s")
    return 0
