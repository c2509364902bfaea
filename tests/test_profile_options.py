"""`stepstream profile`: -t and the OpenMP wait policy as `run` has them, and every output path
checked before the model loads (the outputs are written only after the whole profile)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

import runtime.loader
from runtime.base.errors import StepstreamError
from runtime.cli import main as cli_main
from runtime.cli import profile

needs_proc = pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc")


@pytest.fixture
def calls(monkeypatch, tmp_path):
    """What profile asked for, in order; the load itself stops the command (exit status 2)."""
    seen = []
    monkeypatch.setattr(profile, "choose_wait_policy", lambda threads: seen.append(("wait policy", threads)),
                        raising=False)

    def load(path, **kw):
        seen.append(("load", kw))
        raise StepstreamError("stopped at the load")

    monkeypatch.setattr(runtime.loader, "load", load)
    # a real header: the context is checked from it before the load
    (tmp_path / "model.gguf").symlink_to(Path(runtime.loader.__file__).parent / "data" / "step35-mini-q4_k_m.gguf")
    (tmp_path / "p.txt").write_text("x = 1\n")
    monkeypatch.chdir(tmp_path)
    return seen


def error_line(capsys) -> str:
    lines = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def test_threads_reach_the_wait_policy_and_the_load(calls):
    assert cli_main(["profile", "-m", "model.gguf", "-f", "p.txt", "-t", "3"]) == 2
    assert calls == [("wait policy", 3), ("load", {"n_ctx": None, "n_threads": 3, "cache_type_k": "f16",
                                                   "cache_type_v": "f16"})]


def test_threads_default_is_runs(calls):
    from runtime.cli import run

    parser = argparse.ArgumentParser()
    run.add_arguments(parser)
    assert cli_main(["profile", "-m", "model.gguf", "-f", "p.txt", "--threads", "2"]) == 2
    assert cli_main(["profile", "-m", "model.gguf", "-f", "p.txt"]) == 2
    policies = [c for c in calls if c[0] == "wait policy"]
    assert policies == [("wait policy", 2), ("wait policy", parser.get_default("threads"))]


def test_threads_zero_is_refused(calls, capsys):
    with pytest.raises(SystemExit) as e:
        cli_main(["profile", "-m", "model.gguf", "-f", "p.txt", "-t", "0"])
    assert e.value.code == 2 and "-t/--threads" in capsys.readouterr().err
    assert calls == []


@needs_proc
@pytest.mark.parametrize("flag, path, what", [("-o", "/proc/x.json", "profile"),
                                              ("--trace", "/proc/x.npz", "routing trace")])
def test_unwritable_outputs_are_refused_before_the_load(calls, capsys, flag, path, what):
    assert cli_main(["profile", "-m", "model.gguf", "-f", "p.txt", flag, path]) == 2
    line = error_line(capsys)
    assert path in line and f"cannot write the {what}" in line
    assert calls == []


@needs_proc
def test_default_output_in_an_unwritable_directory_is_refused_before_the_load(calls, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir("/proc")
    assert cli_main(["profile", "-m", str(tmp_path / "model.gguf"), "-f", str(tmp_path / "p.txt")]) == 2
    line = error_line(capsys)
    assert "model.profile.json" in line and "/proc" in line
    assert calls == []


def test_the_checks_leave_no_file(calls):
    assert cli_main(["profile", "-m", "model.gguf", "-f", "p.txt", "-o", "o.json", "--trace", "t.npz"]) == 2
    assert sorted(p.name for p in Path.cwd().iterdir()) == ["model.gguf", "p.txt"]


def test_prompts_cut_to_the_context_are_reported(tmp_path, capsys):
    """A prompt longer than -c minus -n was cut without a word, so the profile covered part of
    the text. The count comes from the shipped model's own tokenizer."""
    import json

    import runtime
    from runtime.cli import main

    model = str(Path(runtime.__file__).parent / "data" / "step35-mini-q4_k_m.gguf")
    long = "def f(x):\\n    return x + 1\\n" * 20
    short = "import os"
    (tmp_path / "p.txt").write_text(f"{long}\n{short}\n")
    n_long = len(runtime.load(model).tokenize(long.replace("\\n", "\n"), special=True))
    out = tmp_path / "prof.json"
    assert main(["profile", "-m", model, "-f", str(tmp_path / "p.txt"), "-t", "1", "-c", "64", "-n", "4",
                 "-o", str(out)]) == 0
    err = capsys.readouterr().err
    assert n_long > 60
    assert (f"note: 1 prompt longer than the 60 tokens -c 64 leaves after -n 4 was cut to 60 ({n_long - 60} tokens "
            f"left out; the first, prompt 1, has {n_long})") in err, err
    assert json.loads(out.read_text())["tokens"] > 0
