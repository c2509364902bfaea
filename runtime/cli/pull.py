"""`stepstream pull USER/MODEL[:QUANT]`: fetch a GGUF model from Hugging Face into its cache
and print its local path, for `-m` or a script:

    stepstream pull bartowski/Some-Model-GGUF:Q4_K_S
    stepstream run -m "$(stepstream pull bartowski/Some-Model-GGUF:Q4_K_S)" -p "Hello"

(`run -hf USER/MODEL[:QUANT]` does both.) runtime.hub chooses the file and fetches it."""

from __future__ import annotations

import argparse
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("repo", metavar="USER/MODEL[:QUANT]",
                   help="a Hugging Face repository, with the quantization to fetch after a colon (default Q4_K_M, or "
                        "the repository's only model)")
    p.add_argument("-hff", "--hf-file", dest="file", metavar="FILE",
                   help="the GGUF file of the repository to fetch, by its path there")


def run(args) -> int:
    from runtime.hub import fetch

    print(fetch(args.repo, args.file, say=lambda text: print(text, file=sys.stderr)))
    return 0
