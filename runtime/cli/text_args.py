"""Text the command line takes: llama.cpp's escapes in -p/-sys/-r, text files read and checked
(UTF-8, not a GGUF, bounded), and output paths checked before the work and written atomically."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from runtime.base.errors import StepstreamError
from runtime.base.paths import written_path


_ESCAPES = {"n": "\n", "r": "\r", "t": "\t", "'": "'", '"': '"', "\\": "\\"}


def process_escapes(text: str) -> str:
    """llama.cpp's escapes in a command-line text (its -e/--escape, on by default): \\n, \\r,
    \\t, \\', \\", \\\\ and \\xHH; any other backslash stays as it is. \\xHH is a byte, as
    in llama.cpp: `caf\\xc3\\xa9` is "café" (it was two characters, U+00C3 U+00A9). Bytes that
    make no UTF-8 come back as surrogates (surrogateescape), which the tokenizer refuses by name."""
    out, i = bytearray(), 0
    while i < len(text):
        c = text[i]
        if c == "\\" and i + 1 < len(text):
            nxt = text[i + 1]
            if nxt in _ESCAPES:
                out += _ESCAPES[nxt].encode()
                i += 2
                continue
            hexa = text[i + 2 : i + 4]
            if nxt == "x" and len(hexa) == 2 and all(h in "0123456789abcdefABCDEF" for h in hexa):
                out.append(int(hexa, 16))
                i += 4
                continue
        out += c.encode("utf-8", "surrogateescape")
        i += 1
    return out.decode("utf-8", "surrogateescape")


def existing_file(what: str):
    """An input that must be a file: a directory or a missing path is refused at parse time."""
    def parse(text: str) -> str:
        path = Path(text)
        if path.is_dir():
            raise argparse.ArgumentTypeError(f"{text} is a directory; give a {what}")
        if not path.exists():
            raise argparse.ArgumentTypeError(f"{text}: no such file; give a {what}")
        return text

    parse.__name__ = "existing_file"
    return parse


MAX_TEXT_FILE = 256 * 2**20  # -f texts are read whole: a perplexity corpus is a few MB
_GGUF_VERSIONS = tuple(v.to_bytes(4, "little") for v in (1, 2, 3))  # after the magic, in a model file


def read_text_file(path: str, what: str) -> str:
    """The whole of a UTF-8 text file ("-": standard input), or one line saying why it cannot be
    read. It is read a chunk at a time and refused at its first byte that is no UTF-8, or once
    past MAX_TEXT_FILE (a GGUF given by mistake, /dev/zero): never read whole first."""
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")()
    parts, done = [], 0
    try:
        f = sys.stdin.buffer if path == "-" else open(path, "rb")
        name = "standard input" if path == "-" else path
        try:
            while True:
                chunk = f.read(4 * 2**20)
                if done == 0 and chunk[:4] == b"GGUF" and chunk[4:8] in _GGUF_VERSIONS:  # not a text about GGUF
                    raise StepstreamError(f"{name} is a GGUF model file; give a {what} (UTF-8 text)")
                try:
                    parts.append(decoder.decode(chunk, final=not chunk))
                except UnicodeDecodeError as e:  # e.object: the bytes held back from the chunk before, then this one
                    at = done - (len(e.object) - len(chunk)) + e.start
                    raise StepstreamError(f"{name}: the {what} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at "
                                          f"offset {at})") from None
                if not chunk:
                    return "".join(parts)
                done += len(chunk)
                if done > MAX_TEXT_FILE:
                    raise StepstreamError(f"{name}: the {what} holds more than {MAX_TEXT_FILE // 2**20} MiB; give a "
                                          "smaller text file")
        finally:
            if f is not sys.stdin.buffer:
                f.close()
    except FileNotFoundError:
        raise StepstreamError(f"{path}: {what} not found") from None
    except IsADirectoryError:
        raise StepstreamError(f"{path} is a directory; give a {what}") from None
    except OSError as e:
        raise StepstreamError(f"{path}: cannot read the {what}: {e.strerror}") from None


def check_text_args(args) -> None:
    """Refuse, before loading, text flags that are no UTF-8 (a Latin-1 terminal, raw bytes): the
    command line hands undecodable bytes over as lone surrogates, which no tokenizer takes. Then
    turn llama.cpp's escapes in them into the characters (unless --no-escape), as llama.cpp does
    by default: a command line copied from it means the same prompt here."""
    from runtime.text.tokenizer import utf8_problem

    if getattr(args, "escape", False):
        for name in ("prompt", "system_prompt", "reverse_prompt"):
            value = getattr(args, name, None)
            if isinstance(value, str):
                setattr(args, name, process_escapes(value))
            elif isinstance(value, list):
                setattr(args, name, [process_escapes(v) if isinstance(v, str) else v for v in value])

    for flag, name in (("-p/--prompt", "prompt"), ("-sys/--system-prompt", "system_prompt"),
                       ("-r/--reverse-prompt", "reverse_prompt")):
        value = getattr(args, name, None)
        for text in value if isinstance(value, list) else [value]:
            why = utf8_problem(text) if isinstance(text, str) else None
            if why is not None:
                raise StepstreamError(f"{flag}: the text is not UTF-8 ({why})")


def writable_output(path: Path, what: str) -> Path:
    """Refuse, before any work, an output path that could not be written at the end: a directory,
    a missing or read-only directory, or one where no file can be made although os.access says
    yes (root in /proc): a file is really made and removed beside `path`."""
    path = Path(path)
    if path.is_dir():
        raise StepstreamError(f"{path} is a directory; give a file name for the {what}")
    parent = path.parent
    if not parent.is_dir():
        raise StepstreamError(f"{path}: cannot write the {what}: the directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise StepstreamError(f"{path}: cannot write the {what}: the directory {parent} is not writable")
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".probe", dir=parent)
    except OSError as e:
        raise StepstreamError(f"{path}: cannot write the {what}: cannot create a file in "
                              f"{parent.absolute()} ({e.strerror})") from None
    os.close(fd)
    os.unlink(probe)
    return path


def write_text_atomically(path: Path, text: str, what: str) -> None:
    """Write `text` to a temporary name beside `path`, then rename it over `path`: a failure or an
    interruption leaves the old file (if any) whole; one line names what went wrong. Through a
    symlink, its target is written (the link stays)."""
    path = written_path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.part")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as e:
        raise StepstreamError(f"{path}: cannot write the {what}: {e.strerror}") from None
    finally:
        tmp.unlink(missing_ok=True)


def add_grammar_args(group) -> None:
    """llama.cpp's --grammar / --grammar-file (on a mutually exclusive group where -j shares it)."""
    group.add_argument("--grammar", default=None, metavar="GBNF",
                       help="constrain the text to this GBNF grammar (llama.cpp's format; it starts at rule 'root')")
    group.add_argument("--grammar-file", default=None, metavar="FILE", help="the same, the grammar read from FILE")


def gbnf_grammar(args):
    """The grammar of --grammar/--grammar-file, compiled before the model loads (None without them)."""
    from runtime.text.gbnf_grammar import GbnfGrammar

    if args.grammar is None and args.grammar_file is None:
        return None
    where = "--grammar" if args.grammar is not None else args.grammar_file
    text = args.grammar if args.grammar is not None else read_text_file(args.grammar_file, "grammar file")
    try:
        return GbnfGrammar(text)
    except StepstreamError as e:
        raise StepstreamError(f"{where}: {e}") from None
