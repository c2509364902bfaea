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
from runtime.cli.common import existing_file, non_negative_int, positive_int, read_text_file, writable_output


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-m", "--model", required=True, type=existing_file("GGUF file"), help="GGUF model")
    p.add_argument("-f", "--file", required=True, help="prompts, one per line")
    p.add_argument("-o", "--output", default=None, help="profile to write (default: MODEL_NAME.profile.json here)")
    p.add_argument("-n", "--n-predict", type=non_negative_int, default=16,
                   help="tokens to generate after each prompt (default: 16)")
    p.add_argument("-c", "--ctx-size", type=positive_int, default=None, help="context size")


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from offload.profile import ExpertProfile, RecordingProvider
    from runtime.loader import load

    text = read_text_file(args.file, "prompts file")
    prompts = [l.replace("\\n", "\n") for l in text.splitlines() if l.strip()]
    if not prompts:
        raise StepstreamError(f"{args.file}: no prompts (one per non-empty line)")
    out = writable_output(Path(args.output), "profile") if args.output else None  # before the work, not after
    model = load(args.model, n_ctx=args.ctx_size)
    if args.n_predict >= model.n_ctx:
        raise StepstreamError(f"-n {args.n_predict} leaves no room for a prompt in a context of {model.n_ctx} tokens "
                              f"(raise -c or lower -n)")
    path = Path(model.file.path)
    out = out or writable_output(Path(f"{path.stem}.profile.json"), "profile")
    profile = ExpertProfile(path.name, path.stat().st_size)
    model.provider = RecordingProvider(model.provider, profile, model.cfg.n_expert)
    for prompt in tqdm(prompts, desc="profile", unit="prompt", file=sys.stderr):
        ids = model.tokenize(prompt, special=True)[: model.n_ctx - args.n_predict]
        model.reset()
        for _ in model.generate(ids, max_tokens=args.n_predict, temperature=0.0):
            pass
        profile.tokens += model.n_past  # positions evaluated: generation stops early at end of text, and its
        # last token is never evaluated, so neither len(ids) + n_predict nor the tokens seen is the count
    try:
        profile.save(out)
    except OSError as e:
        raise StepstreamError(f"{out}: cannot write the profile: {e.strerror}") from None
    print(f"wrote {out}: {profile.tokens} tokens over {len(prompts)} prompts; the top 20% of experts take "
          f"{profile.skew(0.2):.1%} of activations")
    return 0
