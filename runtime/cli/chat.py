"""`stepstream chat`: an interactive conversation on stdin/stdout, rendered with the model's chat template.

Replies go to stdout; everything else (how to leave, dropped turns, a stopped reply) goes to
stderr, one line each. A line that ends with a backslash goes on on the next line (the message
holds a newline there), as in llama-cli; in a terminal, lines are read with readline (editing,
history, and no 4095-byte limit of the terminal's line mode). Ctrl-C during a reply stops that reply and returns to the prompt; at
the prompt it leaves, as do /exit, /quit and Ctrl-D (end of input). When the conversation
outgrows the context, the oldest turns are dropped (runtime.generation.conversation).
"""

from __future__ import annotations

import signal
import sys
import threading

from runtime.base.errors import StepstreamError, Terminated
from runtime.cli.common import (add_model_args, add_mtp_arg, add_reasoning_args, add_sampling_args, load_model,
                                max_tokens, print_stats, sampling_kwargs)
from runtime.cli.text_args import add_grammar_args, check_text_args, gbnf_grammar
from runtime.cli.prompt_progress import PromptProgress
from runtime.generation.conversation import Conversation, Notice
from runtime.generation.loop import sampling_params

HOW_TO_LEAVE = ("chat: type a message and press Enter (end a line with \\ to go on on the next). /exit, /quit or "
                "Ctrl-D leaves; Ctrl-C stops a reply.")


def add_arguments(p) -> None:
    add_model_args(p)
    p.add_argument("-sys", "--system-prompt", default=None, help="system message that opens the conversation")
    add_sampling_args(p)
    add_mtp_arg(p)
    add_reasoning_args(p)
    add_grammar_args(p.add_mutually_exclusive_group())  # each reply follows it (after its reasoning)


def run(args, stdin=None, stdout=None) -> int:
    stdin = stdin or sys.stdin
    out = stdout or sys.stdout
    _stoppable_by_ctrl_c()
    check_text_args(args)
    if args.reasoning_budget_message and args.reasoning_budget < 0:
        raise StepstreamError("--reasoning-budget-message goes with --reasoning-budget N: without a budget nothing "
                              "writes it")
    _has_a_chat_template(args.model)
    grammar = gbnf_grammar(args)  # before the model loads
    model = load_model(args)
    if args.system_prompt:  # checked once here, not reported again on every message
        n = len(model.chat_tokens([{"role": "system", "content": args.system_prompt}]))
        if n + 1 > model.n_ctx:
            raise StepstreamError(f"-sys/--system-prompt: with the chat template it takes {n} tokens, which leaves no "
                                  f"room for a message in a context of {model.n_ctx} (-c/--ctx-size): shorten it or "
                                  f"raise -c")
    conv = Conversation(model, args.system_prompt, sampling_params(**sampling_kwargs(args)), max_tokens(args),
                        args.reverse_prompt, None if args.reasoning_budget < 0 else args.reasoning_budget,
                        args.reasoning_budget_message or "", progress=PromptProgress(model), grammar=grammar)
    print(HOW_TO_LEAVE, file=sys.stderr, flush=True)
    interactive = stdin.isatty()
    while True:
        try:
            line = _read_message(stdin, out, interactive)  # Ctrl-C here leaves (status 130, from main's handler)
        except KeyboardInterrupt:
            if interactive:  # the shell's prompt, or "interrupted", starts a line of its own
                out.write("\n")
                out.flush()
            raise
        if not line or line.strip() in ("/exit", "/quit"):
            if interactive and not line:  # Ctrl-D at "> "
                out.write("\n")
                out.flush()
            print_stats(args, model)
            return 0
        if line.strip():
            _reply(conv, line.rstrip("\n"), out)


def _has_a_chat_template(path: str) -> None:
    """Refuse a model without a chat template from its header, before the load (it was refused at
    the first message, after the whole load)."""
    from runtime.base.gguf_file import GGUFModelFile
    from runtime.base.gguf_schema import Key

    f = GGUFModelFile(path)
    try:
        template = f.get(Key.CHAT_TEMPLATE, None)
    finally:
        f.close()
    if not isinstance(template, str) or not template:
        raise StepstreamError(f"{path}: this model has no chat template ({Key.CHAT_TEMPLATE}); chat needs one, "
                              "`stepstream run` completes plain text")


def _read_message(stdin, out, interactive: bool) -> str:
    """One message: a line, and the lines after each one that ends with a backslash (joined with
    newlines, as llama-cli joins them); "" at the end of input."""
    text = _read_line(stdin, out, "> " if interactive else "")
    while text.endswith("\\\n"):
        more = _read_line(stdin, out, ". " if interactive else "")
        if not more:
            return text[:-2]
        text = text[:-2] + "\n" + more
    return text


def _read_line(stdin, out, prompt: str) -> str:
    """One line of input, with its newline; "" at the end of input. In a terminal, read with
    readline. Bytes that are no UTF-8 come through as lone surrogates (the conversation names the
    first and skips the line) whatever the locale: a strict UTF-8 locale raised
    UnicodeDecodeError out of readline, a traceback."""
    if prompt and stdin is sys.stdin and out is sys.stdout:  # a terminal: input() prompts and edits
        try:
            import readline  # noqa: F401 - input() edits lines with it once imported
        except ImportError:
            pass
        try:
            sys.stdin.reconfigure(errors="surrogateescape")
        except (AttributeError, ValueError):
            pass
        try:
            return input(prompt) + "\n"
        except EOFError:
            return ""
    if prompt:
        out.write(prompt)
        out.flush()
    raw = getattr(stdin, "buffer", None)
    if raw is None:  # a text stream given by a caller (tests)
        return stdin.readline()
    return raw.readline().decode("utf-8", "surrogateescape")


def _stoppable_by_ctrl_c() -> None:
    """Make Ctrl-C raise KeyboardInterrupt even when SIGINT came in ignored. A shell without job
    control starts background commands with SIGINT ignored, and Python keeps an inherited
    SIG_IGN, so a chat started from a script or a background test run would never stop a reply."""
    if threading.current_thread() is threading.main_thread():  # signal handlers live there only
        signal.signal(signal.SIGINT, signal.default_int_handler)


def _reply(conv: Conversation, text: str, out) -> None:
    """Stream one reply to `out`; Ctrl-C stops it (the conversation keeps what was shown)."""
    pieces = conv.reply(text)
    mid_line = False  # a notice in the middle of a reply starts a line of its own
    wrote = False  # a message refused before any reply ends no line on stdout
    try:
        for piece in pieces:
            if isinstance(piece, Notice):
                if mid_line:  # the reply's line ends on stdout, so replies in a file stay apart
                    out.write("\n")
                out.flush()
                print(f"[{piece.text}]", file=sys.stderr, flush=True)
                mid_line = False
            else:
                out.write(piece)
                out.flush()
                mid_line = wrote = True
    except KeyboardInterrupt as e:
        pieces.close()  # runs the conversation's bookkeeping when the interrupt came outside it
        if isinstance(e, Terminated):  # SIGTERM ends the chat (exit 143); Ctrl-C only the reply
            raise
        out.write("\n")
        out.flush()
        print("[reply stopped]", file=sys.stderr, flush=True)
        return
    if wrote and mid_line:  # a notice that ended the reply ended its line too
        out.write("\n")
        out.flush()

