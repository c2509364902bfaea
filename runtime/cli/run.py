"""`stepstream run`: complete a prompt, streaming the text as it is generated."""

from __future__ import annotations

import sys
import time

from runtime.cli.common import (GenerationTiming, add_model_args, add_mtp_arg, add_sampling_args, context_size,
                                load_model, max_tokens, print_stats, sampling_kwargs)
from runtime.cli.text_args import add_grammar_args, check_text_args, gbnf_grammar, read_text_file
from runtime.base.errors import StepstreamError
from runtime.cli.prompt_progress import PromptProgress


def add_arguments(p) -> None:
    add_model_args(p)
    p.add_argument("-p", "--prompt", default=None, help="prompt text")
    p.add_argument("-f", "--file", default=None, help="read the prompt from this file (-: standard input)")
    add_sampling_args(p)
    add_mtp_arg(p)
    p.add_argument("--no-display-prompt", action="store_true", help="do not echo the prompt before the generated text")
    js = p.add_mutually_exclusive_group()
    js.add_argument("-j", "--json-schema", default=None, metavar="SCHEMA",
                    help="constrain the text to a JSON value this JSON Schema accepts ('{}': any JSON), as llama.cpp's -j")
    js.add_argument("-jf", "--json-schema-file", default=None, metavar="FILE",
                    help="the same, the schema read from FILE")
    add_grammar_args(js)
    p.add_argument("--prompt-cache", default=None, metavar="FILE",
                   help="keep the KV cache in FILE: a next run whose prompt begins the same evaluates only what "
                        "is new (the file is written at the end, or at Ctrl-C)")
    p.add_argument("--prompt-cache-ro", action="store_true",
                   help="read --prompt-cache FILE but do not write it")


def json_grammar(args):
    """The grammar of -j/-jf or --grammar/--grammar-file, compiled before the model loads (None
    without them)."""
    import json

    from runtime.text.json_schema import JsonSchemaGrammar

    if args.grammar is not None or args.grammar_file is not None:
        return gbnf_grammar(args)
    if args.json_schema is None and args.json_schema_file is None:
        return None
    where = "-j/--json-schema" if args.json_schema is not None else args.json_schema_file
    text = args.json_schema if args.json_schema is not None else read_text_file(args.json_schema_file, "JSON Schema file")
    try:
        schema = json.loads(text)
    except ValueError as e:
        raise StepstreamError(f"{where}: not JSON ({e})") from None
    try:
        return JsonSchemaGrammar(schema)
    except StepstreamError as e:
        raise StepstreamError(f"{where}: {e}") from None


def prompt_ids(args, prompt: str) -> list[int]:
    """The prompt's ids, from the GGUF header's tokenizer, refused when longer than the context."""
    from runtime.base.gguf_file import GGUFModelFile
    from runtime.text.tokenizer import Tokenizer

    n_ctx = context_size(args)
    tok = Tokenizer.from_gguf(GGUFModelFile(args.model))
    ids = tok.encode(prompt, add_bos=tok.add_bos, special=True)
    if not ids:
        raise StepstreamError(f"{'-p/--prompt' if args.file is None else args.file}: the prompt is empty "
                              f"(this model adds no BOS token to start from)")
    if len(ids) > n_ctx:
        raise StepstreamError(f"{'-p/--prompt' if args.file is None else args.file}: the prompt is {len(ids)} tokens, "
                              f"more than the context of {n_ctx} (-c/--ctx-size): shorten it or raise -c")
    return ids


def _prompt_cache(args):
    from runtime.cli.prompt_cache_file import PromptCacheFile, state_variant

    if args.prompt_cache is None:
        if args.prompt_cache_ro:
            raise StepstreamError("--prompt-cache-ro goes with --prompt-cache FILE")
        return None
    return PromptCacheFile(args.prompt_cache, args.model, state_variant(args), read_only=args.prompt_cache_ro)


def run(args) -> int:
    from runtime.generation import complete, sampling_params

    if (args.prompt is None) == (args.file is None):
        raise StepstreamError("give the prompt with exactly one of -p/--prompt or -f/--file")
    check_text_args(args)
    prompt = args.prompt if args.file is None else read_text_file(args.file, "prompt file")
    params = sampling_params(**sampling_kwargs(args))  # checked before the model loads
    grammar = json_grammar(args)
    ids = prompt_ids(args, prompt)  # and the prompt's length, before the kernels load (a first run compiles them)
    kept = _prompt_cache(args)  # before the model loads: a path it must not write fails fast
    model = load_model(args)
    if kept is not None:
        kept.load_into(model)
        if kept.loaded:
            print(f"prompt cache: {model.reusable(ids):,} of {len(ids):,} prompt tokens reused from {kept.path}",
                  file=sys.stderr)
    out = sys.stdout
    # A long prompt's evaluation shows a bar on a terminal's stderr; the prompt is then echoed once
    # the bar is cleared (echoed before, its last line was what the bar's carriage returns wrote
    # over). Where no bar can show (stderr is no terminal), it is echoed at once, as before.
    progress = PromptProgress(model, len(ids))
    unshown = [not args.no_display_prompt]

    def show_prompt() -> None:
        if unshown[0]:
            unshown[0] = False
            out.write(prompt)
            out.flush()

    if not progress.may_show:
        show_prompt()
    t0 = time.perf_counter()
    first = last = None
    try:
        for piece in complete(model, ids, params, max_tokens(args), args.reverse_prompt, grammar=grammar,
                              between_batches=progress):
            if first is None:
                first = (time.perf_counter(), piece.n_tokens)
                progress.close()
                show_prompt()
            out.write(piece.text)
            out.flush()
            last = piece
    except BaseException as e:  # an error or Ctrl-C: its message on a line of its own, and the stats so far
        progress.close()
        try:
            show_prompt()  # (stopped during the prompt: it is still echoed)
            out.write("\n")
            out.flush()
            print_stats(args, model)
        except OSError:  # a closed stdout: the error that stopped the run matters more
            pass
        if kept is not None and type(e) is KeyboardInterrupt:  # Ctrl-C (not SIGTERM or SIGHUP): what was evaluated is kept
            try:
                kept.save(model)
            except StepstreamError as failed:  # said; the interrupt still ends the run (status 130)
                print(f"warning: {failed}", file=sys.stderr)
        raise
    timing = GenerationTiming(len(ids), t0, first[0], first[1], time.perf_counter(), last.n_tokens)
    out.write("\n")
    out.flush()  # here, where a closed pipe is caught, not at exit
    rate = timing.decode_rate()
    print(f"[{last.finish_reason}] {len(ids)} prompt tokens, {last.n_tokens} generated; first token after "
          f"{timing.first_seconds:.2f} s" + (f", then {rate:.2f} tok/s" if rate is not None else ""), file=sys.stderr)
    print_stats(args, model, timing.speeds())
    if kept is not None:
        kept.save(model)
    return 0
