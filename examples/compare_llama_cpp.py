"""Measure stepstream against llama.cpp on the same GGUF: logits agreement and speed.

    python examples/compare_llama_cpp.py MODEL.gguf [-t 2]

Prints the cosine similarity and top-1 agreement of the two engines' logits on one prompt,
then prefill and decode tokens/s of both with the same threads (the `stepstream bench
--llama-cpp` measurement).
"""

import argparse
import subprocess
import sys

import llama_cpp
import numpy as np

import runtime

p = argparse.ArgumentParser()
p.add_argument("model")
p.add_argument("-t", "--threads", type=int, default=2)
a = p.parse_args()

ours = runtime.load(a.model, n_threads=a.threads)
ids = ours.tokenize("import os\nimport sys\n\n\ndef main(argv):\n    for arg in argv:\n        print(arg)\n")
mine = ours.logits(ids)
llm = llama_cpp.Llama(model_path=a.model, n_ctx=len(ids) + 8, logits_all=True, n_threads=a.threads, verbose=False)
llm.eval(ids)
theirs = np.array(llm.scores[: len(ids)])
cos = (mine * theirs).sum(-1) / np.linalg.norm(mine, axis=-1) / np.linalg.norm(theirs, axis=-1)
print(f"{len(ids)} positions: min cosine {cos.min():.6f}, top-1 agreement {(mine.argmax(-1) == theirs.argmax(-1)).mean():.1%}")
subprocess.run([sys.executable, "-m", "runtime.cli", "bench", "-m", a.model, "-t", str(a.threads), "--llama-cpp"], check=True)
