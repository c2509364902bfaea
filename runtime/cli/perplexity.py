"""`stepstream perplexity -m MODEL -f TEXT [-c N] [--chunks N]`, as llama.cpp's llama-perplexity."""

from __future__ import annotations

import sys
import time

from runtime.base.errors import StepstreamError
from runtime.cli.common import add_model_args, context_size, load_model, print_stats
from runtime.cli.arg_types import chunk_count
from runtime.cli.text_args import read_text_file

CTX = 512  # llama-perplexity's default


def add_arguments(p) -> None:
    add_model_args(p, ctx_default=CTX)
    p.add_argument("-f", "--file", required=True, help="text file to score (-: standard input)")
    p.add_argument("--chunks", type=chunk_count, default=-1, help="score at most this many chunks; -1 = all (default: -1)")


def _tokens_before_loading(path: str, text: str, n_ctx: int) -> list[int] | None:
    """The text's tokens by the file's own tokenizer, read from its header before the model (and
    its kernels) load, so that a text too short is refused at once; None where no tokenizer can
    be read that way (loading then names what is wrong with the file, or the tokenizer)."""
    from runtime.base.gguf_file import GGUFModelFile
    from runtime.generation.perplexity import check_length
    from runtime.text.tokenizer import Tokenizer

    try:
        tokenizer = Tokenizer.from_gguf(GGUFModelFile(path))
    except Exception:
        return None
    tokens = tokenizer.encode(text, add_bos=tokenizer.add_bos, special=False)  # as Model.tokenize
    check_length(len(tokens), n_ctx)
    return tokens


def run(args) -> int:
    from tqdm import tqdm

    from runtime.generation.perplexity import perplexity

    text = read_text_file(args.file, "text file")
    context_size(args)  # a -c beyond the model's context is named first, from the header (-c 0: the model's)
    if args.ctx_size < 4:
        raise StepstreamError(f"-c/--ctx-size {args.ctx_size}: perplexity needs a context of at least 4 tokens")
    tokens = _tokens_before_loading(args.model, text, args.ctx_size)
    model = load_model(args)
    if tokens is None:
        tokens = model.tokenize(text, add_bos=True, special=False)
    n_ctx = args.ctx_size
    n = len(tokens) // n_ctx if args.chunks < 0 else min(args.chunks, len(tokens) // n_ctx)
    bar = None

    def eval_chunk(ids):
        nonlocal bar
        if bar is None:  # only once the text has passed perplexity's checks: an error stays on one line
            bar = tqdm(total=n, desc="perplexity", unit="chunk", file=sys.stderr)
        return model.scored_logits(ids, len(ids) // 2)

    bos = model.tokenizer.bos_id if model.tokenizer.add_bos else None
    running = []  # (chunks done, estimate): what an interruption reports

    def progress(done: int, estimate: float) -> None:
        running[:] = [(done, estimate)]
        bar.set_postfix_str(f"PPL {estimate:.4f}", refresh=False)
        bar.update(1)

    t0 = time.perf_counter()
    try:
        res = perplexity(eval_chunk, tokens, n_ctx, bos, args.chunks, progress)
    except BaseException:  # the bar ends its line before "interrupted" or an error line
        if bar is not None:
            bar.close()
        if running:  # llama-perplexity has printed each chunk's estimate by then; here, the last one
            print(f"interrupted after {running[0][0]} of {n} chunks: estimate so far PPL = {running[0][1]:.4f}",
                  file=sys.stderr, flush=True)
        raise
    seconds = time.perf_counter() - t0
    bar.close()
    print(f"{len(tokens)} tokens, {res.n_chunks} chunk{'s' if res.n_chunks != 1 else ''} of {n_ctx}, "
          f"{res.n_tokens} scored")
    print(f"Final estimate: PPL = {res.ppl:.4f} +/- {res.stderr:.5f}")
    print_stats(args, model, f"{res.n_chunks * n_ctx / seconds:.2f} tok/s evaluated over {res.n_chunks * n_ctx} tokens")
    return 0
