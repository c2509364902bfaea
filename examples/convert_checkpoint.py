"""Convert a Hugging Face Step-3.5 checkpoint to a 4-bit GGUF.

    python examples/convert_checkpoint.py HF_DIR OUT.gguf [--type q4_k_m]

Without arguments it makes the `tiny` miniature checkpoint in a temporary folder and
converts that, so the script runs anywhere.
"""

import argparse
import tempfile
from pathlib import Path

from convert.converter import convert
from convert.mini import write_mini

p = argparse.ArgumentParser()
p.add_argument("hf_dir", nargs="?")
p.add_argument("out", nargs="?")
p.add_argument("--type", default="q4_k_m")
a = p.parse_args()

tmp = Path(tempfile.mkdtemp())
hf_dir = a.hf_dir or write_mini(tmp / "step35-tiny", "tiny")
out = a.out or tmp / "step35-tiny-q4_k_m.gguf"
summary = convert(hf_dir, out, a.type)
print(summary.text())
