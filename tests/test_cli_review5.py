"""Fixes from a review of the command line as a new user meets it: `-f` read a whole file before
looking at it (a GGUF given by mistake: 6.8 GB of RSS to report its byte 503, /dev/zero a
MemoryError traceback); `serve --api-key ''` (an unset variable) served everyone."""

from __future__ import annotations

from pathlib import Path

import pytest

from runtime.base.errors import StepstreamError
from runtime.cli import main
from runtime.cli.text_args import MAX_TEXT_FILE, read_text_file

MODEL = Path(__file__).resolve().parent.parent / "runtime" / "data" / "step35-mini-q4_k_m.gguf"


def test_a_gguf_given_as_the_prompt_file_is_named_at_once(capsys):
    for cmd in (["run", "-m", str(MODEL), "-f", str(MODEL), "-n", "1"],
                ["perplexity", "-m", str(MODEL), "-f", str(MODEL)]):
        assert main(cmd) == 2
        assert capsys.readouterr().err == f"error: {MODEL} is a GGUF model file; give a " \
                                          f"{'prompt file' if cmd[0] == 'run' else 'text file'} (UTF-8 text)\n"


def test_an_endless_or_huge_file_is_refused_past_the_limit():
    with pytest.raises(StepstreamError, match=f"/dev/zero: the prompt file holds more than {MAX_TEXT_FILE // 2**20} MiB"):
        read_text_file("/dev/zero", "prompt file")


@pytest.mark.parametrize("head, tail, at", [
    (b"a" * (4 * 2**20 - 1), "é".encode() + b"ok\xff", 4 * 2**20 + 3),  # a character across the chunk boundary
    (b"a" * (4 * 2**20 - 1), b"\xc3\x28", 4 * 2**20 - 1),  # a bad sequence starting before it
    (b"", b"\xfe", 0),
])
def test_the_first_bad_byte_is_named_wherever_the_chunks_fall(tmp_path, head, tail, at):
    path = tmp_path / "p.txt"
    path.write_bytes(head + tail)
    with pytest.raises(StepstreamError) as e:
        read_text_file(str(path), "prompt file")
    byte = (head + tail)[at]
    assert str(e.value) == f"{path}: the prompt file is not UTF-8 text (byte 0x{byte:02x} at offset {at})"
    path.write_bytes(head + "é".encode() * 3)
    assert read_text_file(str(path), "prompt file") == head.decode() + "ééé"


@pytest.mark.parametrize("key, words", [("", "is empty: give a key, or leave --api-key out"),
                                        ("a b", "holds whitespace or a control character")])
def test_an_api_key_no_client_can_send_is_refused(capsys, key, words):
    with pytest.raises(SystemExit) as e:
        main(["serve", "-m", str(MODEL), "--api-key", key])
    assert e.value.code == 2 and words in capsys.readouterr().err


def test_the_app_refuses_an_empty_key():
    pytest.importorskip("fastapi")
    from runtime.server.app import create_app

    with pytest.raises(StepstreamError, match="an empty API key would admit every request"):
        create_app(None, model_name="m", api_key="")


def test_the_demo_says_why_it_stopped(capsys):
    """-n beyond the demo's context of 1024 stopped at 999 tokens without a word; `run` says it."""
    assert main(["demo", "-n", "2000", "-t", "1"]) == 0
    err = capsys.readouterr().err
    assert "[the demo's context of 1024 tokens is full after " in err
    assert main(["demo", "-n", "3", "-t", "1"]) == 0
    assert "\n[length]\n" in capsys.readouterr().err


def test_a_text_about_gguf_files_is_a_text(tmp_path):
    """The magic alone refused any prompt that starts with the word (a review)."""
    path = tmp_path / "p.txt"
    path.write_text("GGUF is the file format llama.cpp reads.\n")
    assert read_text_file(str(path), "prompt file").startswith("GGUF is")
