"""`stepstream` command line: one subcommand per user task.

Each subcommand lives in its own module, which provides `add_arguments(parser)` and
`run(args) -> int`. Modules are imported only when their subcommand runs, so
`stepstream --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import os
import re
import signal
import sys
import threading
import warnings

from runtime.base.errors import HungUp, StepstreamError, Terminated, raise_terminated

# name -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("runtime.cli.demo", "generate with the embedded trained miniature, experts streaming from disk"),
    "mini": ("runtime.cli.mini", "write a random-weight miniature Step-3.5 checkpoint (HF layout)"),
    "synth": ("runtime.cli.synth", "write a random-weight Step-3.5 GGUF at the real model's widths (benchmarks)"),
    "convert": ("runtime.cli.convert", "convert a Hugging Face Step-3.5 checkpoint to GGUF"),
    "run": ("runtime.cli.run", "complete a prompt with a GGUF model, streaming the text"),
    "chat": ("runtime.cli.chat", "chat with a GGUF model using its chat template"),
    "serve": ("runtime.cli.serve", "serve a GGUF model over an OpenAI-compatible HTTP API"),
    "bench": ("runtime.cli.bench", "measure prefill and decode speed (optionally beside llama.cpp)"),
    "bench-serve": ("runtime.cli.bench_serve",
                    "measure `stepstream serve`: prefix reuse, overhead against `stepstream run`, and a load test"),
    "perplexity": ("runtime.cli.perplexity", "perplexity of a text file, computed as llama.cpp's llama-perplexity does"),
    "pull": ("runtime.cli.pull", "fetch a GGUF model from Hugging Face into its cache, and print its path"),
    "plan": ("runtime.cli.plan", "what run would place in RAM and on disk, the hit rate and the decode speed to expect"),
    "profile": ("runtime.cli.profile", "record per-layer expert activation counts over a prompts file"),
    "train-mini": ("runtime.cli.train_mini", "train the miniature Step-3.5 on the Python stdlib (needs torch)"),
}


class OutputError(StepstreamError):
    """Standard output could not be written (a full disk under `> file`, /dev/full, an I/O error)."""


class _CheckedStdout:
    """sys.stdout for a command: a failed write or flush is an OutputError naming standard output,
    so a full disk under `stepstream bench --json > out.json` is one line and exit status 2, not
    a traceback. A closed pipe stays a BrokenPipeError (handled below: status 141, as `cat`).
    Text the terminal's encoding cannot hold (a reply's emoji on a Latin-1 terminal) is written
    with "?" for what it cannot show, where it ended the command in UnicodeEncodeError."""

    def __init__(self, stream):
        self._stream = stream

    def _failed(self, e: OSError) -> OutputError:
        return OutputError(f"could not write standard output: {e.strerror or e}")

    def write(self, text):
        try:
            try:
                return self._stream.write(text)
            except UnicodeEncodeError:
                encoding = getattr(self._stream, "encoding", None) or "ascii"
                return self._stream.write(text.encode(encoding, "replace").decode(encoding))
        except BrokenPipeError:
            raise
        except OSError as e:
            raise self._failed(e) from None

    def flush(self):
        try:
            self._stream.flush()
        except BrokenPipeError:
            raise
        except OSError as e:
            raise self._failed(e) from None

    def __getattr__(self, name):
        return getattr(self._stream, name)


def _quiet_stdout() -> None:
    """Point stdout at /dev/null: Python flushes it again at exit and would fail again."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):
        pass


# llama.cpp options users type first, and what does their job here
LLAMA_CPP_HINTS = {o: "the GPU tier is placed by bytes here: --gpu-budget SIZE (or auto)"
                   for o in ("-ngl", "-ncmoe", "-cmoe", "-ot", "-sm", "-mg", "-ts", "-nkvo", "-dev")}
LLAMA_CPP_HINTS.update({"-fa": "there is no flash-attention switch here",
                        "-mmp": "the file is always mapped; --ram-budget streams experts instead",
                        "-ub": "the prefill chunk is -b/--batch-size"})


class SubcommandParser(argparse.ArgumentParser):
    """A subcommand's parser: a bad argument is one line on stderr (exit status 2), as every other
    error is, instead of the usage block followed by the error."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def _takes_attached(self, arg: str) -> bool:
        """Whether `arg` reads as a short option with its value attached (-pHello): the option
        takes a value and the rest is a value it accepts (-ngl is no -n of "gl")."""
        action = self._option_string_actions.get(arg[:2])
        if action is None or action.nargs is not None or not action.option_strings:
            return False
        try:
            if action.type is not None:
                action.type(arg[2:])
        except (argparse.ArgumentTypeError, TypeError, ValueError):
            return False
        return True

    def parse_args(self, args=None, namespace=None):
        """As argparse's, but a value that starts with a minus and a digit and is no plain number
        (`--ram-budget -5GiB`) stays the flag's value, so that the flag's own check says what is
        wrong with it; argparse took it for an option ("expected one argument")."""
        args = list(sys.argv[1:] if args is None else args)
        takes_value = {o for a in self._actions if a.nargs is None and a.option_strings for o in a.option_strings}
        known = {o for a in self._actions for o in a.option_strings}
        for i, a in enumerate(args):  # llama.cpp's -ngl read as `-n gl` (then "'gl' is not an integer" named -n)
            if a == "--":
                break
            after_flag = i > 0 and args[i - 1] in takes_value  # a value such as `--temp -inf`
            attached = a not in LLAMA_CPP_HINTS and self._takes_attached(a)  # argparse's -pHello: -p with Hello
            if re.fullmatch(r"-[A-Za-z][A-Za-z-]+", a) and a not in known and not after_flag and not attached:
                hint = LLAMA_CPP_HINTS.get(a, "")
                self.error(f"unrecognized option {a}" + (f"; {hint}" if hint else ""))
        joined, i = [], 0
        while i < len(args):
            if args[i] in takes_value and i + 1 < len(args) and re.match(r"-\d", args[i + 1]) \
                    and not self._negative_number_matcher.match(args[i + 1]):
                joined.append(f"{args[i]}={args[i + 1]}")
                i += 2
            else:
                joined.append(args[i])
                i += 1
        return super().parse_args(joined, namespace)


def package_version() -> str:
    """The installed package's version, from its metadata."""
    try:
        return importlib.metadata.version("stepstream")
    except importlib.metadata.PackageNotFoundError:
        return "(version unknown: the package is not installed; pip install -e .)"


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser: it lists the subcommands; each one's arguments come from its module."""
    parser = argparse.ArgumentParser(prog="stepstream", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, (_, help_text) in SUBCOMMANDS.items():
        sub.add_parser(name, help=help_text, description=help_text, add_help=False)
    return parser


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    """A warning as the command line prints it: one line, without Python's source location."""
    return f"warning: {message}\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in SUBCOMMANDS:
        build_parser().parse_args(argv)  # prints the help or a usage error, and exits
        return 2
    name = argv[0]
    module = importlib.import_module(SUBCOMMANDS[name][0])
    sub = SubcommandParser(prog=f"stepstream {name}", description=SUBCOMMANDS[name][1])
    module.add_arguments(sub)
    args = sub.parse_args(argv[1:])
    warnings.formatwarning = _one_line_warning
    plain, sys.stdout = sys.stdout, _CheckedStdout(sys.stdout)
    # SIGTERM (`kill`, a job's time limit) unwinds as Ctrl-C does and exits with 143 (`serve`
    # installs its own handler: it stops gracefully)
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, raise_terminated) if main_thread else None
    # SIGHUP (the terminal closed, an ssh session dropped) likewise, exit 129; left as it is when
    # ignored (`nohup`) or when the command set its own
    hup = getattr(signal, "SIGHUP", None)
    hup_before = signal.getsignal(hup) if main_thread and hup is not None else None
    if hup_before is signal.SIG_DFL:
        signal.signal(hup, raise_terminated)
    try:
        if getattr(args, "hf_repo", None):  # -hf: the model fetched first (runtime.cli.common.add_model_source)
            from runtime.hub import fetch

            args.model = str(fetch(args.hf_repo, args.hf_file, say=lambda text: print(text, file=sys.stderr),
                                   token=args.hf_token))
        elif getattr(args, "hf_file", None) or getattr(args, "hf_token", None) and hasattr(args, "hf_repo"):
            flag = "--hf-file" if getattr(args, "hf_file", None) else "--hf-token"
            raise StepstreamError(f"{flag} goes with -hf (a model on Hugging Face): give -hf too")
        code = int(module.run(args) or 0)
        sys.stdout.flush()  # a full disk under stdout is found here, not in Python's flush at exit
        return code
    except StepstreamError as e:
        if isinstance(e, OutputError):
            _quiet_stdout()
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        kind = "hung up" if isinstance(e, HungUp) else "terminated" if isinstance(e, Terminated) else "interrupted"
        try:
            print(kind, file=sys.stderr)
        except OSError:  # a hung-up terminal
            pass
        return {"hung up": 129, "terminated": 143}.get(kind, 130)  # 128 + the signal, what a shell shows
    except BrokenPipeError:
        # The reader went away (`stepstream run ... | head`): stop quietly, as `cat` does. Python
        # would flush stdout again at exit and fail again, so stdout goes to /dev/null first.
        _quiet_stdout()
        return 141  # 128 + SIGPIPE, the status a shell shows for a writer killed by the pipe
    finally:
        sys.stdout = plain
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        if hup_before is signal.SIG_DFL:
            signal.signal(hup, hup_before)

