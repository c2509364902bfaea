"""`stepstream synth`'s output: checked before any work, never overwritten without --force, and
the temporary file of a killed run removed by the next run to the same output, as `convert` does.
A file its file system cannot hold is refused before writing, and a disk that fills up mid-write
is one line (the disk cases on a real tmpfs, mounted when the tests run as root)."""

from __future__ import annotations

import errno
import os
import shutil
import stat
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from runtime.base.errors import StepstreamError
from runtime.bench import synth
from runtime.cli import main as cli_main

TINY = ["--moe-layers", "1", "--hidden", "256", "--heads", "2", "--heads-sliding", "4", "--kv-heads", "1",
        "--experts", "16", "--top-k", "4", "--expert-ffn", "256", "--shared-ffn", "256", "--dense-ffn", "512",
        "--vocab", "512", "--quiet"]


def error_line(capsys) -> str:
    lines = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc")
def test_unwritable_place_is_one_line(capsys):
    assert cli_main(["synth", "/proc/syn.gguf", *TINY]) == 2
    line = error_line(capsys)
    assert "/proc/syn.gguf" in line and "cannot write" in line


def test_missing_directory_is_refused(tmp_path, capsys):
    out = tmp_path / "nodir" / "s.gguf"
    assert cli_main(["synth", str(out), *TINY]) == 2
    assert str(out) in error_line(capsys) and not out.parent.exists()


def test_existing_output_is_kept_unless_forced(tmp_path, capsys):
    out = tmp_path / "s.gguf"
    assert cli_main(["synth", str(out), *TINY]) == 0
    first = out.read_bytes()
    capsys.readouterr()
    assert cli_main(["synth", str(out), *TINY, "--seed", "1"]) == 2
    line = error_line(capsys)
    assert str(out) in line and "already exists" in line and "--force" in line
    assert out.read_bytes() == first
    assert cli_main(["synth", str(out), *TINY, "--seed", "1", "--force"]) == 0
    assert out.read_bytes() != first and len(out.read_bytes()) == len(first)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.gguf"]


def test_a_fifo_is_refused_even_with_force_and_a_symlink_is_written_through(tmp_path, capsys):
    """--force replaced a FIFO, a device (as root, /dev/null) or a symlink with a regular file
    (a review's finding): the output is published by a rename. A FIFO stands in for the device."""
    fifo = tmp_path / "pipe.gguf"
    os.mkfifo(fifo)
    assert cli_main(["synth", str(fifo), *TINY, "--force"]) == 2
    line = error_line(capsys)
    assert str(fifo) in line and "is a FIFO" in line and "even with --force" in line
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    elsewhere = tmp_path / "disk2"
    elsewhere.mkdir()
    target = elsewhere / "real.gguf"
    target.write_bytes(b"an older model")
    link = tmp_path / "s.gguf"
    link.symlink_to(target)
    assert cli_main(["synth", str(link), *TINY, "--force"]) == 0
    assert link.is_symlink() and os.readlink(link) == str(target)  # the link stays, its target is the new file
    assert target.read_bytes()[:4] == b"GGUF"
    assert sorted(p.name for p in elsewhere.iterdir()) == ["real.gguf"]


def test_killed_runs_temporary_files_are_removed(tmp_path):
    out = tmp_path / "s.gguf"
    dead = dead_pid()
    stale = [tmp_path / f".s.gguf.{dead}.part",  # the converter's name, which synth now writes
             tmp_path / f"s.gguf.part{dead}"]  # the name earlier versions wrote
    with subprocess.Popen(["sleep", "60"]) as live:
        try:
            kept = [tmp_path / f".s.gguf.{live.pid}.part", tmp_path / f"s.gguf.part{live.pid}"]  # a running synth's
            other = tmp_path / f".t.gguf.{dead}.part"  # another output's
            for p in stale + kept + [other]:
                p.write_bytes(b"x" * 100)
            assert cli_main(["synth", str(out), *TINY]) == 0
            assert not any(p.exists() for p in stale)
            assert all(p.exists() for p in kept + [other])
        finally:
            live.kill()


@pytest.fixture
def tmpfs(tmp_path):
    """A real tmpfs of 8 MB (root only): mount(8), then umount."""
    mnt = tmp_path / f"fs-{uuid.uuid4().hex[:6]}"
    mnt.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_an_output_that_cannot_fit_is_refused_before_writing(tmpfs, capsys):
    (tmpfs / "filler").write_bytes(b"x" * 7_000_000)  # about 1 MB left for a 2.6 MB file
    out = tmpfs / "s.gguf"
    assert cli_main(["synth", str(out), *TINY]) == 2
    line = error_line(capsys)
    assert str(out) in line and "needs 2.6 MB (2,613,088 bytes)" in line and "free" in line, line
    assert sorted(p.name for p in tmpfs.iterdir()) == ["filler"]


def test_a_disk_filling_up_mid_write_is_one_line(tmpfs, capsys, monkeypatch):
    """The file system fills up (another process's file) after the first tensor's blocks: one
    line naming the output and the error, exit 2, and no temporary file left."""
    real, calls = synth.random_blocks, []

    def fill_the_disk_then(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            with open(tmpfs / "filler", "wb") as f:
                with pytest.raises(OSError) as e:
                    while True:
                        f.write(b"x" * 65536)
                        f.flush()
                assert e.value.errno == errno.ENOSPC
        return real(*args, **kwargs)

    monkeypatch.setattr(synth, "random_blocks", fill_the_disk_then)
    out = tmpfs / "s.gguf"
    assert cli_main(["synth", str(out), *TINY]) == 2
    line = error_line(capsys)
    assert str(out) in line and "No space left on device" in line and "of 2.6 MB" in line, line
    assert sorted(p.name for p in tmpfs.iterdir()) == ["filler"]


@pytest.mark.parametrize("layers", [["--moe-layers", "100000"], ["--moe-layers", "45", "--dense-layers", "1"]])
def test_more_layers_than_the_real_model_are_refused(tmpfs, capsys, layers):
    """On a small tmpfs, so that a synth that took them would fill it and not the test machine's disk."""
    out = tmpfs / "s.gguf"
    assert cli_main(["synth", str(out), *TINY, *layers]) == 2
    line = error_line(capsys)
    assert "--moe-layers" in line and "45" in line, line
    assert list(tmpfs.iterdir()) == []


def test_a_model_without_moe_layers_is_refused(tmp_path, capsys):
    """synth writes models whose experts stream; one without (which plan would then refuse) is
    refused in one line, and in the API too."""
    out = tmp_path / "s.gguf"
    with pytest.raises(SystemExit) as e:
        cli_main(["synth", str(out), *TINY, "--moe-layers", "0"])
    assert e.value.code == 2 and "argument --moe-layers: must be a positive integer, got 0" in capsys.readouterr().err
    with pytest.raises(StepstreamError, match="--moe-layers 0: the model needs at least one MoE layer"):
        synth.write_synth(out, moe_layers=0, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_the_real_models_depth_is_accepted(tmp_path):
    out = tmp_path / "s.gguf"
    assert cli_main(["synth", str(out), *TINY, "--moe-layers", "42", "--dense-layers", "3"]) == 0
    assert out.stat().st_size > 0
