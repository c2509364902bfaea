"""`stepstream profile -m MODEL -f PROMPTS.txt [-o FILE] [-n N]`: record expert activation counts.

Each non-empty line of PROMPTS.txt is a prompt (write `\\n` for a newline inside one). The
model evaluates it from an empty cache and then greedily generates N tokens; every routed
expert activation is counted per layer. `run --profile FILE` pins the most-used experts.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from runtime.base.errors import StepstreamError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-m", "--model", required=True, help="GGUF model")
    p.add_argument("-f", "--file", required=True, help="prompts, one per line")
    p.add_argument("-o", "--output", default=None, help="profile to write (default: MODEL_NAME.profile.json here)")
    p.add_argument("-n", "--n-predict", type=int, default=16, help="tokens to generate after each prompt (default: 16)")
    p.add_argument("-c", "--ctx-size", type=int, default=None, help="context size")


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from offload.profile import ExpertProfile, RecordingProvider
    from runtime.loader import load

    try:
        prompts = [l.replace("\\n", "\n") for l in Path(args.file).read_text(encoding="utf-8").splitlines() if l.strip()]
    except FileNotFoundError:
        raise StepstreamError(f"{args.file}: prompts file not found") from None
    if not prompts:
        raise StepstreamError(f"{args.file}: no prompts (one per non-empty line)")
    model = load(args.model, n_ctx=args.ctx_size)
    path = Path(model.file.path)
    profile = ExpertProfile(path.name, path.stat().st_size)
    model.provider = RecordingProvider(model.provider, profile, model.cfg.n_expert)
    for prompt in tqdm(prompts, desc="profile", unit="prompt", file=sys.stderr):
        ids = model.tokenize(prompt, special=True)[: model.n_ctx - args.n_predict]
        model.reset()
        for _ in model.generate(ids, max_tokens=args.n_predict, temperature=0.0):
            pass
        profile.tokens += len(ids) + args.n_predict
    out = Path(args.output or f"{path.stem}.profile.json")
    profile.save(out)
    print(f"wrote {out}: {profile.tokens} tokens over {len(prompts)} prompts; the top 20% of experts take "
          f"{profile.skew(0.2):.1%} of activations")
    return 0
