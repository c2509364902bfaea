"""Convert a Hugging Face Step-3.5 checkpoint to a 4-bit GGUF.

    python examples/convert_checkpoint.py HF_DIR OUT.gguf [--type q4_k_m] [--force]

Without arguments it makes the `tiny` miniature checkpoint in a temporary folder, converts
that and removes the folder, so the script runs anywhere and leaves nothing behind. A bad
argument or input (an unknown --type, a directory with no config.json, an existing OUT
without --force) is one line on stderr and exit status 2, as in `stepstream convert`.
"""

import argparse
import sys
import tempfile
from pathlib import Path

from convert import policy
from convert.converter import convert
from convert.mini import write_mini
from runtime.base.errors import StepstreamError
from runtime.cli import SubcommandParser

p = SubcommandParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("hf_dir", nargs="?", help="Hugging Face checkpoint directory (default: a tiny miniature made here)")
p.add_argument("out", nargs="?", help="output .gguf path; an existing file is an error unless --force")
p.add_argument("--type", dest="ftype", default=policy.DEFAULT_TYPE, choices=policy.TYPES, type=str.lower,
               help="output format (default %(default)s); any case (Q4_K_M)")
p.add_argument("--force", action="store_true", help="replace OUT if it exists")
a = p.parse_args()
if a.hf_dir is not None and a.out is None:
    p.error(f"give OUT.gguf after HF_DIR {a.hf_dir}")

try:
    if a.hf_dir is not None:
        summary = convert(a.hf_dir, a.out, a.ftype, force=a.force)
    else:
        with tempfile.TemporaryDirectory(prefix="step35-tiny-") as tmp:
            hf_dir = write_mini(Path(tmp) / "step35-tiny", "tiny")
            summary = convert(hf_dir, Path(tmp) / f"step35-tiny-{a.ftype}.gguf", a.ftype)
except StepstreamError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
print(summary.text())
if a.hf_dir is None:
    print("(the miniature and its GGUF were in a temporary folder, now removed; give HF_DIR OUT.gguf to keep one)")
