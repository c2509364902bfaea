"""`stepstream pull USER/MODEL[:QUANT]`: fetch a GGUF model from Hugging Face into its cache
and print its local path, for `-m` or a script:

    stepstream pull bartowski/Some-Model-GGUF:Q4_K_S
    stepstream run -m "$(stepstream pull bartowski/Some-Model-GGUF:Q4_K_S)" -p "Hello"

(`run -hf USER/MODEL[:QUANT]` does both.) runtime.hub chooses the file and fetches it."""

from __future__ import annotations

import argparse
import sys

from runtime.cli.common import add_hub_args


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("repo", metavar="USER/MODEL[:QUANT]",
                   help="a Hugging Face repository, with the quantization to fetch after a colon (default Q4_K_M, else "
                        "Q8_0, else the first model)")
    add_hub_args(p, dest="file")


def run(args) -> int:
    from runtime.hub import fetch

    print(fetch(args.repo, args.file, say=lambda text: print(text, file=sys.stderr), token=args.hf_token))
    return 0
