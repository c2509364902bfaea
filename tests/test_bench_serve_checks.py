"""`stepstream bench-serve` refuses, before it starts a server, the arguments that leave it
nothing to measure or a conversation the server's context cannot hold: one line, exit status 2."""

from __future__ import annotations

from pathlib import Path

import pytest

from runtime.bench import serve as bench
from runtime.cli import main

MODEL = str(Path(__file__).resolve().parent.parent / "runtime" / "data" / "step35-mini-q4_k_m.gguf")


@pytest.fixture
def no_server(monkeypatch):
    """Fail the test if the command gets as far as starting a server."""
    def started_server(*args, **kwargs):
        raise AssertionError("bench-serve started a server")

    monkeypatch.setattr(bench, "started_server", started_server)


def _refused(capsys, *argv: str) -> str:
    assert main(["bench-serve", "-m", MODEL, *argv]) == 2
    out = capsys.readouterr()
    assert out.out == ""
    return out.err


def test_skipping_every_part_is_refused(capsys, no_server, monkeypatch):
    monkeypatch.setattr(bench, "chat_counter", lambda *a: pytest.fail("read the model before refusing"))
    err = _refused(capsys, "--skip", "reuse", "--skip", "overhead", "--skip", "load")
    assert err == ("error: --skip reuse, --skip overhead and --skip load leave nothing to measure; "
                   "skip at most two of the three parts\n")


def test_a_conversation_longer_than_the_default_context_is_refused(capsys, no_server, monkeypatch):
    monkeypatch.setattr(bench, "stdlib_conversation", lambda *a: pytest.fail("built the conversation first"))
    assert bench.served_context(MODEL, None) == 4096  # the shipped model's 65,536, capped at 4096 as the loader does
    err = _refused(capsys, "--conversation-tokens", "100000")
    assert err == ("error: --conversation-tokens 100000 does not fit in the server's context of 4096 tokens "
                   "(no --ctx-size: the model's context, at most 4096): the two turns need about 100160 tokens; "
                   "lower --conversation-tokens or raise --ctx-size\n")


def test_a_conversation_longer_than_ctx_size_is_refused(capsys, no_server, monkeypatch):
    monkeypatch.setattr(bench, "stdlib_conversation", lambda *a: pytest.fail("built the conversation first"))
    err = _refused(capsys, "-c", "1024", "--conversation-tokens", "5000", "--reply-tokens", "8")
    assert err == ("error: --conversation-tokens 5000 does not fit in --ctx-size 1024: the two turns need about "
                   "5088 tokens; lower --conversation-tokens or raise --ctx-size\n")


def test_a_conversation_that_leaves_no_room_for_the_replies_is_refused(capsys, no_server):
    count, _ = bench.chat_counter(MODEL)
    need = count(bench.stdlib_conversation(count, 1000)) + 3 * 32 + 64  # the two turns, with 32-token replies
    assert need > 1024
    err = _refused(capsys, "-c", "1024", "--conversation-tokens", "1000")
    assert err == (f"error: --conversation-tokens 1000 does not fit in --ctx-size 1024: the two turns need about "
                   f"{need} tokens; lower --conversation-tokens or raise --ctx-size\n")


@pytest.mark.parametrize("argv", [["-c", "1024", "--conversation-tokens", "300"], ["--skip", "reuse", "--skip", "load"],
                                  ["--skip", "overhead", "--skip", "load", "--conversation-tokens", "2000"]])
def test_arguments_that_fit_go_on_to_start_the_server(capsys, no_server, monkeypatch, argv):
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")  # the command would set it for its children, and keep it
    with pytest.raises(AssertionError, match="started a server"):
        main(["bench-serve", "-m", MODEL, *argv])
