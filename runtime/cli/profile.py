"""`stepstream profile -m MODEL (-f PROMPTS.txt | --random-tokens T) [-o FILE] [-n N] [--trace FILE] [-t N]`:
record expert activation counts.

Each non-empty line of PROMPTS.txt is a prompt (write `\\n` for a newline inside one). The
model evaluates it from an empty cache and then greedily generates N tokens; every routed
expert activation is counted per layer. `run --profile FILE` pins the most-used experts.
--random-tokens evaluates T uniformly drawn token ids instead (teacher-forced, one prompt):
what a file without a tokenizer (`stepstream synth`) can be profiled on.
With --trace, the ordered routing (every token's experts in every MoE layer, offload.trace)
is written too, for `python -m offload.simulate` to replay against cache policies.
"""

from __future__ import annotations

import argparse
import os
import stat
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

from offload.profile import is_profile
from offload.trace import is_trace
from runtime.base.errors import StepstreamError
from runtime.base.gguf_file import split_parts
from runtime.base.system import choose_wait_policy
from runtime.cli.common import add_cache_type_args, context_size
from runtime.cli.arg_types import non_negative_int, positive_int
from runtime.cli.text_args import existing_file, read_text_file, writable_output


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-m", "--model", required=True, type=existing_file("GGUF file"), help="GGUF model")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("-f", "--file", help="prompts, one per line (-: standard input)")
    src.add_argument("--random-tokens", type=positive_int, default=None, metavar="T",
                     help="evaluate T random token ids instead of prompts (files without a tokenizer)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="seed of --random-tokens (default: 0)")
    p.add_argument("-o", "--output", default=None, help="profile to write (default: MODEL_NAME.profile.json here)")
    p.add_argument("-n", "--n-predict", type=non_negative_int, default=16,
                   help="tokens to generate after each prompt (default: 16)")
    p.add_argument("--trace", default=None, metavar="FILE",
                   help="also write the routing trace (.npz: every token's experts per MoE layer, in order)")
    p.add_argument("-c", "--ctx-size", type=positive_int, default=None,
                   help="context size in tokens (default: model's, at most 4096)")
    add_cache_type_args(p)
    p.add_argument("-t", "--threads", type=positive_int, default=None,
                   help="compute threads (default: the libraries' choice)")


def creatable(path: Path, what: str) -> Path:
    """writable_output (which makes and removes a file beside `path`): the outputs are written
    after the whole profile."""
    return writable_output(path, what)


def _same_file(a: Path, b: Path) -> bool:
    """Whether a and b are one file: the same path once resolved, or (both existing) the same
    inode, so that a symlink or a hard link to the file counts."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one does not exist (yet)
        return False


def _looks_like(path: Path) -> str:
    """What an existing file that is no output of ours seems to be, for the refusal."""
    st = path.stat()
    if not stat.S_ISREG(st.st_mode):
        kinds = [(stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a FIFO"),
                 (stat.S_ISSOCK, "a socket")]
        return next((name for test, name in kinds if test(st.st_mode)), "not a regular file")
    try:
        with path.open("rb") as f:
            head = f.read(64)
    except OSError as e:
        return f"a file that cannot be read ({e.strerror})"
    if head.startswith(b"GGUF"):
        return "a GGUF model file"
    if is_trace(path):
        return "a routing trace (.npz)"
    if is_profile(path):
        return "an expert profile (JSON)"
    if head.startswith(b"PK"):
        return "a zip archive, not a routing trace"
    if head.lstrip()[:1] in (b"{", b"["):
        return "JSON that is not an expert profile"
    return f"a file that is neither a profile nor a trace ({st.st_size} bytes, starting {head[:16]!r})"


def check_outputs(model: Path, prompts: str | None, outputs: list[tuple[str, Path, str]]) -> None:
    """Refuse, before the load, outputs that would replace what the run reads or each other, or an
    existing file that is not an earlier output of the same kind. `outputs` holds (flag, path,
    what) of the profile, then of the trace if any.

    An earlier profile (or trace) is replaced, as llama.cpp's tools overwrite their outputs; an
    empty file (made by mktemp) too. Anything else (a model, the prompts, a trace given as -o,
    some other JSON) is left alone: the user removes it or picks another name."""
    inputs = [(f"the model (-m {model})", part) for part in split_parts(model)]
    if prompts is not None:
        inputs.append((f"the prompts file (-f {prompts})", Path(prompts)))
    for flag, path, what in outputs:
        for source, given in inputs:
            if _same_file(path, given):
                raise StepstreamError(f"{flag} {path}: is {source}; the {what} would replace it (give the {what} "
                                      f"another name)")
    if len(outputs) == 2 and _same_file(outputs[0][1], outputs[1][1]):
        (f1, p1, _), (f2, p2, _) = outputs
        raise StepstreamError(f"{f1} {p1} and {f2} {p2} are the same file: the routing trace would replace the "
                              f"profile (give them different names)")
    ours = {"profile": is_profile, "routing trace": is_trace}
    for flag, path, what in outputs:
        try:
            st = path.stat()
        except FileNotFoundError:
            continue
        except OSError as e:
            raise StepstreamError(f"{flag} {path}: cannot look at the existing file ({e.strerror})") from None
        if stat.S_ISREG(st.st_mode) and (st.st_size == 0 or ours[what](path)):
            continue
        raise StepstreamError(f"{flag} {path}: already exists and is {_looks_like(path)}; `stepstream profile` replaces only an "
                              f"earlier {what} (remove the file or give another name)")


def save_outputs(saves: list[tuple[Path, str, Callable[[Path], None]]]) -> None:
    """Write each (path, what, save) in turn, all of them even when one fails (the work is done);
    a failure is one line naming what was written and what was not."""
    written, failed = [], []
    for path, what, save in saves:
        try:
            save(path)
            written.append(f"the {what} {path}")
        except StepstreamError as e:
            failed.append(str(e))
    if failed:
        raise StepstreamError("; ".join(failed) + (f"; wrote {' and '.join(written)}" if written else
                                                   "; nothing was written"))


def _feed(model, ids: list[int]) -> np.ndarray:
    """Evaluate ids in whole chunks of n_batch, the rest one token at a time; the last logits.

    The provider then sees either a chunk's routing token by token (prefill) or one token's
    experts (decode), never a few tokens' experts merged into one request (the model's path
    for 2..FEW_TOKENS tokens), so the routing trace keeps every token apart.
    """
    whole = len(ids) // model.options.n_batch * model.options.n_batch
    logits = model.eval(ids[:whole]) if whole else None
    for tok in ids[whole:]:
        logits = model.eval([tok])
    return logits


def _greedy(model, ids: list[int], n_predict: int) -> None:
    """Greedy generation of up to n_predict tokens after ids, as `generate(temperature=0)` does:
    it stops at end of generation or of the context, and the last token is never evaluated."""
    logits = _feed(model, ids)
    eog = model.tokenizer.eog_ids
    for n in range(1, n_predict + 1):
        tok = int(np.argmax(logits))
        if tok in eog or n == n_predict or model.n_past + 1 > model.n_ctx:
            return
        logits = model.eval([tok])


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from offload.profile import ExpertProfile, RecordingProvider
    from offload.trace import TraceRecorder
    from runtime.loader import load

    if args.file is not None:
        text = read_text_file(args.file, "prompts file")
        prompts = [l.replace("\\n", "\n") for l in text.splitlines() if l.strip()]
        if not prompts:
            raise StepstreamError(f"{args.file}: no prompts (one per non-empty line)")
    # before the work, not after: the default output goes to this directory under the model's name
    # (its first part's, for a split model: the name the profile records)
    model_path = Path(args.model)
    out = creatable(Path(args.output or f"{split_parts(model_path)[0].stem}.profile.json"), "profile")
    trace_out = creatable(Path(args.trace), "routing trace") if args.trace else None
    outputs = [("-o" if args.output else "the default output", out, "profile")]
    if trace_out is not None:
        outputs.append(("--trace", trace_out, "routing trace"))
    check_outputs(model_path, args.file, outputs)
    choose_wait_policy(args.threads)  # as `run` does: passive OpenMP waits when other processes hold the cores
    # From the header, before loading: random tokens are teacher-forced (nothing generated after them)
    if args.random_tokens is not None:
        context_size(args, args.random_tokens, f"--random-tokens {args.random_tokens}")
    n_ctx = context_size(args)
    if args.random_tokens is None and args.n_predict >= n_ctx:
        raise StepstreamError(f"-n {args.n_predict} leaves no room for a prompt in a context of {n_ctx} tokens "
                              f"(raise -c or lower -n)")
    model = load(args.model, n_ctx=args.ctx_size, n_threads=args.threads, cache_type_k=args.cache_type_k,
                 cache_type_v=args.cache_type_v)
    if args.random_tokens is not None:
        prompts = [np.random.default_rng(args.seed).integers(0, model.cfg.vocab, args.random_tokens).tolist()]
    path = Path(model.file.path)
    profile = ExpertProfile(Path(os.path.realpath(path)).name, path.stat().st_size)  # the file's name, not a link's
    recorder = TraceRecorder(model.cfg.n_expert_used) if trace_out else None
    model.provider = RecordingProvider(model.provider, profile, model.cfg.n_expert, trace=recorder)
    room = model.n_ctx - args.n_predict
    cut = []  # (line number, tokens) of the prompts longer than the room -c leaves after -n
    for number, prompt in enumerate(tqdm(prompts, desc="profile", unit="prompt", file=sys.stderr), 1):
        if recorder is not None:
            recorder.start_prompt()
        model.reset()
        if isinstance(prompt, list):  # random ids, teacher-forced: nothing to generate from
            _feed(model, prompt)
        else:
            ids = model.tokenize(prompt, special=True)
            if len(ids) > room:
                cut.append((number, len(ids)))
            _greedy(model, ids[:room], args.n_predict)
        profile.tokens += model.n_past  # positions evaluated: generation stops early at end of text, and its
        # last token is never evaluated, so neither len(ids) + n_predict nor the tokens seen is the count
    saves = [(out, "profile", profile.save)]
    if recorder is not None:
        moe = {i: model.cfg.n_expert for i in range(model.cfg.n_layers) if model.cfg.moe[i]}
        trace = recorder.trace(profile.model, path.stat().st_size, moe)
        saves.append((trace_out, "routing trace", trace.save))
    save_outputs(saves)
    if recorder is not None:
        print(f"wrote {trace_out}: routing of {trace.tokens} tokens over {len(moe)} MoE layers, top-{trace.top_k}")
    n_expert = model.cfg.n_expert
    top = max(1, int(round(n_expert * 0.2)))  # as ExpertProfile.skew counts them
    print(f"wrote {out}: {profile.tokens} tokens over {len(prompts)} prompts; the top {top} of each layer's "
          f"{n_expert} experts ({top / n_expert:.1%}) take {profile.skew(0.2):.1%} of activations")
    if cut:
        lost = sum(n - room for _, n in cut)
        print(f"note: {len(cut)} prompt{'s' if len(cut) > 1 else ''} longer than the {room} tokens -c {model.n_ctx} "
              f"leaves after -n {args.n_predict} {'were' if len(cut) > 1 else 'was'} cut to {room} ({lost} tokens "
              f"left out; the first, prompt {cut[0][0]}, has {cut[0][1]}): raise -c to profile them whole",
              file=sys.stderr)
    return 0
