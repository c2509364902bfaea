"""`stepstream synth`'s output: checked before any work, never overwritten without --force, and
the temporary file of a killed run removed by the next run to the same output, as `convert` does."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

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
