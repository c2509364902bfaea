"""Context sizes on the command line: a -c beyond the model's context, a prompt or a bench
longer than the context, a perplexity context too small, each refused in one line naming the
flag (before loading where the header alone tells), never the API's n_ctx. `bench` sizes the
context to -p + -n as llama-bench does, so a long bench runs without -c.

Reference: the model's context length from its GGUF header (gguf-py), the prompt's length
from the tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest
from gguf import GGUFReader

import runtime
from runtime.cli import main

MODEL = str(Path(runtime.__file__).parent / "data" / "step35-mini-q4_k_m.gguf")


def _context_length() -> int:
    f = GGUFReader(MODEL).fields["step35.context_length"]
    return int(f.parts[f.data[0]][0])


def _error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    return err[-1]


def test_a_ctx_size_beyond_the_models_is_named_before_loading(capsys, monkeypatch):
    import runtime.loader
    monkeypatch.setattr(runtime.loader, "load", lambda *a, **k: pytest.fail("loaded"))
    n = _context_length()
    for cmd in (["run", "-p", "hi"], ["chat"], ["bench"], ["perplexity", "-f", __file__]):
        assert _error(capsys, [cmd[0], "-m", MODEL, "-c", str(n + 1), *cmd[1:]]) == \
            f"error: -c/--ctx-size {n + 1} exceeds the context length of {MODEL}: {n}"


def test_bench_needs_room_for_its_prompt_and_tokens(capsys, monkeypatch):
    import runtime.loader
    monkeypatch.setattr(runtime.loader, "load", lambda *a, **k: pytest.fail("loaded"))
    assert _error(capsys, ["bench", "-m", MODEL, "-p", "4000", "-n", "200", "-c", "1024"]) == \
        "error: -p 4000 and -n 200 need 4200 positions, more than -c/--ctx-size 1024"
    n = _context_length()
    assert _error(capsys, ["bench", "-m", MODEL, "-p", str(n), "-n", "1"]) == \
        f"error: -p {n} and -n 1 need {n + 1} positions, more than the context length of {MODEL}: {n}"
    assert _error(capsys, ["perplexity", "-m", MODEL, "-f", __file__, "-c", "3"]) == \
        "error: -c/--ctx-size 3: perplexity needs a context of at least 4 tokens"


def test_bench_beyond_the_default_context_sizes_it(capsys):
    assert main(["bench", "-m", MODEL, "-t", "1", "-p", "4100", "-n", "2", "--json"]) == 0
    out = capsys.readouterr().out
    assert '"n_prompt": 4100' in out and '"decode_tok_s"' in out


@pytest.mark.parametrize("ctx", [2, 8])
def test_a_prompt_longer_than_the_context_is_refused_before_it_is_shown(capsys, monkeypatch, ctx):
    text = "def main():\n    return 1\n"
    n = len(runtime.load(MODEL).tokenize(text, special=True))
    assert n > ctx
    from runtime import loader  # refused before the model and its kernels load (a first run compiles them a minute)
    monkeypatch.setattr(loader, "load", lambda *a, **k: pytest.fail("the model was loaded first"))
    assert main(["run", "-m", MODEL, "-t", "1", "-c", str(ctx), "-p", text]) == 2
    cap = capsys.readouterr()
    assert cap.out == ""  # the prompt was not echoed
    assert cap.err.strip().splitlines()[-1] == (f"error: -p/--prompt: the prompt is {n} tokens, more than the context "
                                                f"of {ctx} (-c/--ctx-size): shorten it or raise -c")
