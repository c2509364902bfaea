"""Measure stepstream against llama.cpp on the same GGUF: logits agreement and speed.

    python examples/compare_llama_cpp.py MODEL.gguf [-t 2]

Prints the cosine similarity and top-1 agreement of the two engines' logits on one prompt,
then prefill and decode tokens/s of both with the same threads (the `stepstream bench
--llama-cpp` measurement). A bad argument or model file is one line on stderr and exit
status 2, as in the `stepstream` commands.
"""

import argparse
import subprocess
import sys

import numpy as np

import runtime
from runtime.base.errors import StepstreamError
from runtime.cli import SubcommandParser
from runtime.cli.arg_types import positive_int

p = SubcommandParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("model")
p.add_argument("-t", "--threads", type=positive_int, default=2)
a = p.parse_args()

try:  # after the arguments: a bad one is refused without this import
    import llama_cpp
except ImportError:
    print("error: this comparison needs llama-cpp-python: pip install 'llama-cpp-python>=0.3.36' "
          "(or the test extras, pip install -e '.[test]')", file=sys.stderr)
    sys.exit(2)

try:
    ours = runtime.load(a.model, n_threads=a.threads)
except StepstreamError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
ids = ours.tokenize("import os\nimport sys\n\n\ndef main(argv):\n    for arg in argv:\n        print(arg)\n")
mine = ours.logits(ids)
llm = llama_cpp.Llama(model_path=a.model, n_ctx=len(ids) + 8, logits_all=True, n_threads=a.threads, verbose=False)
llm.eval(ids)
theirs = np.array(llm.scores[: len(ids)])
cos = (mine * theirs).sum(-1) / np.linalg.norm(mine, axis=-1) / np.linalg.norm(theirs, axis=-1)
print(f"{len(ids)} positions: min cosine {cos.min():.6f}, top-1 agreement {(mine.argmax(-1) == theirs.argmax(-1)).mean():.1%}")
# bench reports its own errors in one line; its status is this script's
sys.exit(subprocess.run([sys.executable, "-m", "runtime.cli", "bench", "-m", a.model, "-t", str(a.threads),
                         "--llama-cpp"]).returncode)
