"""`stepstream profile`'s outputs: never written over its own inputs or each other, nor over a file
that is not an earlier output; a full disk leaves no temporary file and says what was written;
two writers of one path leave a whole file from one of them.

The command runs as a user runs it (a subprocess, from the repository root), on a copy of the
shipped model; the full disk is a real tmpfs (skipped where mounting is not permitted)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from tests.helpers.full_fs import full_tmpfs

import runtime
from offload.profile import ExpertProfile
from offload.trace import RoutingTrace
from runtime.base.errors import StepstreamError
from runtime.cli import main

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = Path(runtime.__file__).parent / "data" / "step35-mini-q4_k_m.gguf"


def profile(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "runtime.cli", "profile", "-n", "2", "-t", "1", *map(str, args)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)


def profile_here(capsys, *args) -> SimpleNamespace:
    """The same command through the command line's own entry point in this process: for refusals,
    which come before anything loads, without a process start each (the first case of the
    refusal test also runs as a subprocess, as a user runs it)."""
    code = main(["profile", "-n", "2", "-t", "1", *map(str, args)])
    out = capsys.readouterr()
    return SimpleNamespace(returncode=code, stdout=out.out, stderr=out.err)


def error_line(proc) -> str:
    # tqdm's bar lines, at any rate ("1.13s/prompt" on a loaded machine as well as "2.0prompt/s")
    lines = [l for l in proc.stderr.splitlines() if l.strip() and "%|" not in l]
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr
    return lines[0]


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> Path:
    """A directory with a copy of the model, a prompts file, and a profile and a trace of one real run."""
    d = tmp_path_factory.mktemp("outputs")
    shutil.copy(SHIPPED, d / "m.gguf")
    (d / "p.txt").write_text("def f(x): return x\nimport os\n")
    proc = profile("-m", d / "m.gguf", "-f", d / "p.txt", "-o", d / "p.json", "--trace", d / "t.npz")
    assert proc.returncode == 0, proc.stderr
    return d


@pytest.fixture
def work(made, tmp_path) -> Path:
    """The model, prompts, profile and trace in a directory of the test's own, plus links to the model."""
    for name in ("m.gguf", "p.txt", "p.json", "t.npz"):
        shutil.copy(made / name, tmp_path / name)
    (tmp_path / "sym.gguf").symlink_to("m.gguf")
    (tmp_path / "hard.gguf").hardlink_to(tmp_path / "m.gguf")
    shutil.copy(SHIPPED, tmp_path / "other.gguf")  # a model the run does not read
    (tmp_path / "other.json").write_text('{"results": [1, 2]}')
    return tmp_path


@pytest.mark.parametrize("outputs, flag, says", [
    (["-o", "m.gguf"], "-o", "is the model (-m"),
    (["-o", "x.json", "--trace", "m.gguf"], "--trace", "is the model (-m"),
    (["-o", "p.txt"], "-o", "is the prompts file (-f"),
    (["-o", "x.json", "--trace", "p.txt"], "--trace", "is the prompts file (-f"),
    (["-o", "sym.gguf"], "-o", "is the model (-m"),
    (["-o", "hard.gguf"], "-o", "is the model (-m"),
    (["-o", "new.json", "--trace", "new.json"], "-o", "are the same file"),
    (["-o", "p.json", "--trace", "sym.json"], "-o", "are the same file"),
    (["-o", "other.gguf"], "-o", "a GGUF model file"),
    (["-o", "x.json", "--trace", "other.gguf"], "--trace", "a GGUF model file"),
    (["-o", "t.npz"], "-o", "a routing trace"),
    (["-o", "x.json", "--trace", "p.json"], "--trace", "an expert profile"),
    (["-o", "other.json"], "-o", "JSON that is not an expert profile"),
])
def test_an_output_over_an_input_another_output_or_a_foreign_file_is_refused(work, outputs, flag, says, capsys):
    if "sym.json" in outputs:
        (work / "sym.json").symlink_to("p.json")
    before = {p.name: md5(p) for p in work.iterdir() if p.is_file()}
    args = [a if a.startswith("-") else work / a for a in outputs]
    run = profile if outputs == ["-o", "m.gguf"] else lambda *a: profile_here(capsys, *a)
    line = error_line(run("-m", work / "m.gguf", "-f", work / "p.txt", *args))
    assert f"{flag} {work / outputs[outputs.index(flag) + 1]}" in line and says in line, line
    assert {p.name: md5(p) for p in work.iterdir() if p.is_file()} == before
    assert md5(work / "m.gguf") == md5(SHIPPED)


def test_a_fifo_is_refused_as_an_output(work, capsys):
    """Not /dev/null: the old code, run as root, renamed its output over the device."""
    os.mkfifo(work / "fifo")
    line = error_line(profile_here(capsys, "-m", work / "m.gguf", "-f", work / "p.txt", "-o", work / "fifo"))
    assert f"-o {work / 'fifo'}" in line and "a FIFO" in line
    assert (work / "fifo").is_fifo()


def test_earlier_outputs_and_empty_files_are_replaced(work):
    """As llama.cpp's tools overwrite theirs: a profile and a trace from an earlier run, or an empty
    file (mktemp's), are replaced by whole new ones."""
    (work / "p.json").write_text(json.dumps({"model": "m.gguf", "model_bytes": 1, "tokens": 7, "counts": {"1": [7]}}))
    (work / "e.npz").touch()
    proc = profile("-m", work / "m.gguf", "-f", work / "p.txt", "-o", work / "p.json", "--trace", work / "e.npz")
    assert proc.returncode == 0, proc.stderr
    assert ExpertProfile.load(work / "p.json", work / "m.gguf").tokens > 7
    assert RoutingTrace.load(work / "e.npz").tokens > 0
    assert not [p.name for p in work.iterdir() if p.name.endswith(".part")]


# ---- a full disk ---------------------------------------------------------------------------------

@pytest.fixture
def full_fs(tmp_path) -> Path:
    """A real tmpfs of 64 KiB, filled: writes fail with ENOSPC, empty files can still be made."""
    with full_tmpfs(tmp_path / "full") as mnt:
        yield mnt


def test_save_on_a_full_disk_removes_its_temporary_file(full_fs):
    prof = ExpertProfile("m.gguf", 1, {1: list(range(5000))}, 5)
    trace = RoutingTrace(np.zeros((5000, 1, 1), np.int16), np.array([1], np.int32), np.array([8], np.int32),
                         np.array([0]), "m.gguf", 1)
    for save, name in ((prof.save, "p.json"), (trace.save, "t.npz")):
        with pytest.raises(StepstreamError, match="No space left on device"):
            save(full_fs / name)
    assert sorted(p.name for p in full_fs.iterdir()) == ["fill"]


@pytest.mark.parametrize("full", ["profile", "trace"])
def test_a_full_disk_says_which_outputs_were_written(work, full_fs, full):
    out = (full_fs if full == "profile" else work) / "new.json"
    trace = (full_fs if full == "trace" else work) / "new.npz"
    line = error_line(profile("-m", work / "m.gguf", "-f", work / "p.txt", "-o", out, "--trace", trace))
    failed, written = (out, trace) if full == "profile" else (trace, out)
    assert f"{failed}: cannot write the" in line and "No space left on device" in line
    assert line.endswith(f"wrote the {'routing trace' if full == 'profile' else 'profile'} {written}"), line
    assert written.stat().st_size > 0 and not failed.exists()
    assert sorted(p.name for p in full_fs.iterdir()) == ["fill"]


# ---- two writers of one path ---------------------------------------------------------------------

WRITER = """
import sys
import numpy as np
from offload.profile import ExpertProfile
from offload.trace import RoutingTrace
kind, path, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
if kind == "profile":
    thing = ExpertProfile(f"m{seed}.gguf", seed, {1: list(range(seed, seed + 20000))}, seed)
else:
    rng = np.random.default_rng(seed)
    ids = np.argsort(rng.random((40000, 64)), axis=1)[:, :8].reshape(40000, 1, 8).astype(np.int16)
    thing = RoutingTrace(ids, np.array([1], np.int32), np.array([64], np.int32), np.array([0]), f"m{seed}.gguf", seed)
print("ready", flush=True)
sys.stdin.readline()
for _ in range(150):
    thing.save(path)
"""


def read_whole(kind: str, path: Path) -> str | None:
    """The writer's model name in the file at `path`, or None when there is none (yet)."""
    try:
        if kind == "profile":
            return ExpertProfile.load(path).model
        return RoutingTrace.load(path).model
    except StepstreamError as e:
        if "not found" in str(e):
            return None
        raise


@pytest.mark.parametrize("kind", ["profile", "trace"])
def test_two_processes_saving_one_path_leave_a_whole_file(tmp_path, kind):
    path = tmp_path / f"out.{'json' if kind == 'profile' else 'npz'}"
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, kind, str(path), str(seed)], cwd=ROOT, text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for seed in (1, 2)]
    for p in procs:
        assert p.stdout.readline().strip() == "ready", p.stderr.read()
    for p in procs:  # both start saving together
        p.stdin.write("go\n")
        p.stdin.flush()
    seen = set()
    while any(p.poll() is None for p in procs):
        seen.add(read_whole(kind, path))  # raises on a file that is not whole
    errors = [p.communicate()[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors
    seen.add(read_whole(kind, path))
    assert seen - {None} <= {"m1.gguf", "m2.gguf"} and seen - {None}
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


def test_two_threads_saving_one_path_leave_a_whole_file(tmp_path):
    path = tmp_path / "out.json"
    errors = []

    def write(seed: int) -> None:
        prof = ExpertProfile(f"m{seed}.gguf", seed, {1: list(range(seed, seed + 20000))}, seed)
        try:
            for _ in range(100):
                prof.save(path)
        except Exception as e:  # noqa: BLE001 (any failure of a writer fails the test)
            errors.append(repr(e))

    threads = [threading.Thread(target=write, args=(seed,)) for seed in (1, 2)]
    for t in threads:
        t.start()
    seen = set()
    while any(t.is_alive() for t in threads):
        seen.add(read_whole("profile", path))
    for t in threads:
        t.join()
    assert errors == []
    assert ExpertProfile.load(path).model in {"m1.gguf", "m2.gguf"}
    assert seen - {None} <= {"m1.gguf", "m2.gguf"}
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]
