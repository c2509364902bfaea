"""`stepstream run --prompt-cache FILE` (runtime/cli/prompt_cache_file.py) on the shipped model:
a second run of the same prompt, or of one that begins with it, reuses the file's positions and
prints the text a run without the file prints; a file of another run (other activations) or a
damaged one is said and replaced; a path holding anything else (the model itself) is refused
before loading and left as it is; --prompt-cache-ro never writes; Ctrl-C keeps what was evaluated.

Reference: the same run without --prompt-cache; the reuse counts from the tokenizer."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import runtime
from runtime.cli import main
from runtime.model.state_file import read_header

MODEL = str(Path(runtime.__file__).parent / "data" / "step35-mini-q4_k_m.gguf")
SOURCE = Path()  # the prompt file: about 1,200 tokens of Python (the _source fixture writes it)


@pytest.fixture(autouse=True, scope="module")
def _source(tmp_path_factory):
    """Long enough to pass the miniature's sliding window (128) many times over and to be cut
    after 1,000 tokens; short enough to keep the runs quick."""
    global SOURCE
    lines = (Path(runtime.__file__).parent / "model" / "prompt_reuse.py").read_text().splitlines(keepends=True)
    SOURCE = tmp_path_factory.mktemp("prompt") / "source.py"
    SOURCE.write_text("".join(lines[:70]))


def _run(capsys, cache, *extra, prompt_file=None):
    argv = ["run", "-m", MODEL, "-f", str(prompt_file or SOURCE), "-n", "12", "--temp", "0", "-c", "4096",
            "--no-display-prompt", *extra]
    if cache is not None:
        argv += ["--prompt-cache", str(cache)]
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def _reused(err: str) -> int:
    m = re.search(r"prompt cache: ([\d,]+) of ([\d,]+) prompt tokens reused", err)
    return int(m.group(1).replace(",", "")) if m else 0


def _n_prompt(err: str) -> int:
    return int(re.search(r"\] (\d+) prompt tokens", err).group(1))


def test_a_second_run_reuses_the_prompt_and_prints_the_same_text(tmp_path, capsys):
    cache = tmp_path / "p.kvstate"
    code, fresh, err = _run(capsys, None)
    assert code == 0
    n = _n_prompt(err)
    code, first, err = _run(capsys, cache)
    assert code == 0 and first == fresh and _reused(err) == 0 and f"{n + 11:,} tokens saved to {cache}" in err
    assert len(read_header(cache)["tokens"]) == n + 11  # the prompt and the reply but its last token
    code, second, err = _run(capsys, cache)
    assert code == 0 and second == fresh and _reused(err) == n - 1  # the last prompt token is evaluated for its logits
    # a prompt that begins with the first one, not with its reply: the prompt's positions come back
    longer = tmp_path / "longer.py"
    longer.write_text(SOURCE.read_text() + "\n\ndef more():\n    return 42\n")
    code, out_long, err = _run(capsys, cache, prompt_file=longer)
    assert code == 0 and _reused(err) >= n - 1
    assert (_run(capsys, None, prompt_file=longer)[1]) == out_long


def test_a_file_of_another_run_or_a_damaged_one_is_replaced(tmp_path, capsys):
    cache = tmp_path / "p.kvstate"
    code, fresh, _ = _run(capsys, None)
    assert _run(capsys, cache, "--activations", "f32")[0] == 0
    assert read_header(cache)["identity"].endswith("activations f32")
    code, out, err = _run(capsys, cache)  # q8 activations: the f32 run's cache is not these bits
    assert code == 0 and out == fresh and _reused(err) == 0
    assert "saved by another model or run" in err and "evaluated from the start and the file replaced" in err
    assert read_header(cache)["identity"].endswith("activations q8")
    data = bytearray(cache.read_bytes())
    data[-100] ^= 0xFF  # an array's byte: its CRC-32 no longer matches
    cache.write_bytes(bytes(data))
    code, out, err = _run(capsys, cache)
    assert code == 0 and out == fresh and _reused(err) == 0
    assert f"{cache}: damaged state file" in err
    code, out, err = _run(capsys, cache)  # rewritten whole
    assert code == 0 and out == fresh and _reused(err) > 0


def test_a_path_holding_something_else_is_refused_before_loading(tmp_path, capsys, monkeypatch):
    import runtime.loader

    monkeypatch.setattr(runtime.loader, "load", lambda *a, **k: pytest.fail("loaded"))
    model_bytes = Path(MODEL).stat()
    code, _, err = _run(capsys, MODEL)  # the model given by mistake
    assert code == 2 and "not a stepstream prompt-cache file; it is left as it is" in err
    assert Path(MODEL).stat().st_mtime_ns == model_bytes.st_mtime_ns
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes")
    assert _run(capsys, notes)[0] == 2 and notes.read_text() == "my notes"
    assert "a directory" in _run(capsys, tmp_path)[2]
    assert "cannot write in" in _run(capsys, tmp_path / "missing" / "p.kvstate")[2]
    assert "no such file" in _run(capsys, tmp_path / "none.kvstate", "--prompt-cache-ro")[2]
    code, _, err = _run(capsys, None, "--prompt-cache-ro")
    assert code == 2 and "--prompt-cache-ro goes with --prompt-cache FILE" in err


def test_read_only_reuses_and_never_writes(tmp_path, capsys):
    cache = tmp_path / "p.kvstate"
    assert _run(capsys, cache)[0] == 0
    before = cache.read_bytes()
    longer = tmp_path / "longer.py"
    longer.write_text(SOURCE.read_text() + "\n# and more\n")
    code, _, err = _run(capsys, cache, "--prompt-cache-ro", prompt_file=longer)
    assert code == 0 and _reused(err) > 0 and "saved" not in err and cache.read_bytes() == before


def test_ctrl_c_keeps_what_was_evaluated(tmp_path, capsys, monkeypatch):
    """Interrupted in its prompt, a run keeps the batches it evaluated: the next run goes on from there."""
    import runtime.generation

    cache = tmp_path / "p.kvstate"
    real = runtime.generation.complete

    def interrupted(model, ids, *args, **kw):
        model.eval_prompt(ids[:1000])  # the first batches, then Ctrl-C
        raise KeyboardInterrupt
        yield

    monkeypatch.setattr(runtime.generation, "complete", interrupted)
    code, _, err = _run(capsys, cache)
    assert code == 130 and "1,000 tokens saved" in err
    monkeypatch.setattr(runtime.generation, "complete", real)
    code, out, err = _run(capsys, cache)
    assert code == 0 and _reused(err) == 1000  # all it held: the prompt goes on from there
    assert out == _run(capsys, None)[1]


def test_paths_that_are_no_regular_file_are_refused_in_one_line(tmp_path, capsys, monkeypatch):
    """(review 95) A FIFO hung the run before loading; a device was replaced by a regular file; a
    name too long or a directory this user cannot search ended in a traceback."""
    import os

    import runtime.loader

    monkeypatch.setattr(runtime.loader, "load", lambda *a, **k: pytest.fail("loaded"))
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    code, _, err = _run(capsys, fifo)
    assert code == 2 and "not a regular file; it is left as it is" in err
    code, _, err = _run(capsys, "/dev/null")
    assert code == 2 and "/dev/null: not a regular file" in err and Path("/dev/null").is_char_device()
    code, _, err = _run(capsys, tmp_path / ("x" * 300))
    assert code == 2 and err.strip().splitlines()[-1].endswith("File name too long")


def test_a_link_is_followed_and_another_format_version_replaced(tmp_path, capsys):
    from runtime.model.state_file import MAGIC

    target = tmp_path / "real.kvstate"
    link = tmp_path / "link.kvstate"
    link.symlink_to(target)
    assert _run(capsys, link)[0] == 0
    assert link.is_symlink() and read_header(target)["tokens"]  # the file it names was written
    code, _, err = _run(capsys, link)
    assert code == 0 and _reused(err) > 0
    other = tmp_path / "v9.kvstate"
    other.write_bytes(MAGIC[:14] + b"\x09\x00" + b"\x00" * 64)  # the format's name, another version
    code, _, err = _run(capsys, other)
    assert code == 0 and "another format version" in err and "file replaced" in err
    assert read_header(other)["tokens"]


def test_an_interrupted_run_that_cannot_save_still_ends_as_interrupted(tmp_path, capsys, monkeypatch):
    import runtime.cli.prompt_cache_file as pcf
    import runtime.generation

    def interrupted(model, ids, *args, **kw):
        model.eval_prompt(ids[:300])
        raise KeyboardInterrupt
        yield

    def full(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(runtime.generation, "complete", interrupted)
    monkeypatch.setattr(pcf, "write", full)
    code, _, err = _run(capsys, tmp_path / "p.kvstate")
    assert code == 130 and "warning: --prompt-cache" in err and "No space left on device" in err
    assert not (tmp_path / "p.kvstate").exists()


def test_the_python_api_saves_and_loads_state_files(tmp_path, capsys):
    """Model.save_state_file / load_state_file (llama.cpp's llama_state_save_file / load_file): a
    new model that loads the file continues with the bits a fresh evaluation gives; the files are
    run --prompt-cache's, both ways; another run's file or a damaged one is refused, the cache
    untouched."""
    import numpy as np

    from runtime.base.errors import StepstreamError
    from runtime.model.kv_state import StateMismatch
    from runtime.model.state_file import StateFileError

    ids = None
    path = tmp_path / "s.kvstate"
    with runtime.load(MODEL, n_ctx=4096) as m:
        ids = m.tokenize(SOURCE.read_text())
        m.eval_prompt(ids)
        size = m.save_state_file(path)
        assert size == path.stat().st_size
        want = m.eval([5, 6, 7])
    with runtime.load(MODEL, n_ctx=4096) as m:
        assert m.load_state_file(path) == len(ids)
        assert m.reusable(ids + [1]) == len(ids)
        assert np.array_equal(m.eval([5, 6, 7]), want)
        # run --prompt-cache reads what the API wrote (and the other way round)
        code, _, err = _run(capsys, path)
        assert code == 0 and _reused(err) == len(ids) - 1
        assert m.load_state_file(path) > len(ids)
    with runtime.load(MODEL, n_ctx=4096, activations="f32") as m:
        m.eval([1, 2, 3])
        with pytest.raises(StateMismatch, match="saved by another model or run"):
            m.load_state_file(path)
        assert m.n_past == 3
        data = bytearray(path.read_bytes())
        data[-50] ^= 0xFF
        path.write_bytes(bytes(data))
        m.reset()
        with pytest.raises(StateFileError, match="damaged state file"):
            runtime.load(MODEL, n_ctx=4096).load_state_file(path)
        with pytest.raises(StepstreamError, match="cannot write the state"):
            m.save_state_file(tmp_path / "missing" / "x.kvstate")
