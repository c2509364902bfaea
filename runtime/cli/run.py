"""`stepstream run`: complete a prompt, streaming the text as it is generated."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from runtime.cli.common import add_model_args, add_sampling_args, load_model, max_tokens, print_stats, sampling_kwargs
from runtime.base.errors import StepstreamError
from runtime.generation import complete, sampling_params


def add_arguments(p) -> None:
    add_model_args(p)
    p.add_argument("-p", "--prompt", default=None, help="prompt text")
    p.add_argument("-f", "--file", default=None, help="read the prompt from this file")
    add_sampling_args(p)
    p.add_argument("--no-display-prompt", action="store_true", help="do not echo the prompt before the generated text")


def run(args) -> int:
    if (args.prompt is None) == (args.file is None):
        raise StepstreamError("give the prompt with exactly one of -p/--prompt or -f/--file")
    prompt = args.prompt if args.file is None else Path(args.file).read_text(encoding="utf-8")
    model = load_model(args)
    out = sys.stdout
    if not args.no_display_prompt:
        out.write(prompt)
        out.flush()
    ids = model.tokenize(prompt, special=True)
    t0 = time.perf_counter()
    first = last = None
    for piece in complete(model, ids, sampling_params(**sampling_kwargs(args)), max_tokens(args), args.reverse_prompt):
        first = first or time.perf_counter()
        out.write(piece.text)
        out.flush()
        last = piece
    t1 = time.perf_counter()
    out.write("\n")
    print(f"[{last.finish_reason}] {len(ids)} prompt tokens, {last.n_tokens} generated; first token after "
          f"{first - t0:.2f} s, then {max(last.n_tokens - 1, 0) / max(t1 - first, 1e-9):.2f} tok/s", file=sys.stderr)
    print_stats(args, model)
    return 0
