"""`stepstream perplexity -m MODEL -f TEXT [-c N] [--chunks N]`, as llama.cpp's llama-perplexity."""

from __future__ import annotations

import sys
from pathlib import Path

from runtime.cli.common import add_model_args, load_model, print_stats
from runtime.base.errors import StepstreamError


def add_arguments(p) -> None:
    add_model_args(p)
    p.set_defaults(ctx_size=512)
    p.add_argument("-f", "--file", required=True, help="text file to score")
    p.add_argument("--chunks", type=int, default=-1, help="score at most this many chunks (default: all)")


def run(args) -> int:
    from tqdm import tqdm

    from runtime.generation.perplexity import perplexity

    try:
        text = Path(args.file).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise StepstreamError(f"{args.file}: text file not found") from None
    model = load_model(args)
    tokens = model.tokenize(text, add_bos=True, special=False)
    n_ctx = args.ctx_size
    n = len(tokens) // n_ctx if args.chunks < 0 else min(args.chunks, len(tokens) // n_ctx)
    bar = tqdm(total=n, desc="perplexity", unit="chunk", file=sys.stderr)
    bos = model.tokenizer.bos_id if model.tokenizer.add_bos else None
    res = perplexity(lambda ids: model.logits(ids), tokens, n_ctx, bos, args.chunks, iter(lambda: bar.update(1), object()))
    bar.close()
    print(f"{len(tokens)} tokens, {res.n_chunks} chunks of {n_ctx}, {res.n_tokens} scored")
    print(f"Final estimate: PPL = {res.ppl:.4f} +/- {res.stderr:.5f}")
    print_stats(args, model)
    return 0
