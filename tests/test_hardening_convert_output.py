"""The converter's output: never clobbered without --force, never partial under its final name.

Real `stepstream convert` processes are interrupted with SIGINT, SIGTERM and SIGKILL at random
moments; the final name must then hold nothing or the complete file, and converting again must
give a file byte-identical to an uninterrupted conversion.

The long campaign (random moments over the whole run, from interpreter start to rename) runs with
    python -m pytest -m slow tests/test_hardening_convert_output.py
and STEPSTREAM_KILL_ROUNDS=N sets how many kills it makes (default 12).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import gguf
import pytest

from convert import converter
from convert.output_file import part_name
from runtime.cli import main

REPO = Path(__file__).resolve().parents[1]
FTYPE = "q8_0"


@pytest.fixture(scope="module")
def reference(tiny_ckpt, tmp_path_factory) -> bytes:
    """The bytes of an uninterrupted conversion."""
    out = tmp_path_factory.mktemp("ref") / "m.gguf"
    converter.convert(tiny_ckpt, out, FTYPE, progress=False)
    return out.read_bytes()


def _dir(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir())


def test_existing_output_is_refused_without_force(tiny_ckpt, tmp_path, capsys, reference):
    out = tmp_path / "m.gguf"
    out.write_bytes(b"previous model")
    rc = main(["convert", str(tiny_ckpt), str(out), "--type", FTYPE, "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and str(out) in err and "already exists" in err and "--force" in err
    assert out.read_bytes() == b"previous model" and _dir(out) == ["m.gguf"]
    assert main(["convert", str(tiny_ckpt), str(out), "--type", FTYPE, "--no-progress", "--force"]) == 0
    assert out.read_bytes() == reference and _dir(out) == ["m.gguf"]


def test_a_symlink_or_dangling_link_counts_as_existing(tiny_ckpt, tmp_path, capsys):
    target = tmp_path / "elsewhere.gguf"
    out = tmp_path / "m.gguf"
    out.symlink_to(target)  # dangling: writing through it would create `target`
    assert main(["convert", str(tiny_ckpt), str(out), "--type", FTYPE, "--no-progress"]) == 2
    assert "already exists" in capsys.readouterr().err and not target.exists() and out.is_symlink()


def test_output_that_appears_during_conversion_is_not_replaced(tiny_ckpt, tmp_path, capsys, monkeypatch):
    out = tmp_path / "m.gguf"
    real = converter.write_tensor
    calls = []

    def write_and_race(f, ckpt, spec, *args):
        if not calls:
            out.write_bytes(b"written by someone else meanwhile")
        calls.append(spec)
        return real(f, ckpt, spec, *args)

    monkeypatch.setattr(converter, "write_tensor", write_and_race)
    rc = main(["convert", str(tiny_ckpt), str(out), "--type", FTYPE, "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "appeared while converting" in err and len(calls) > 1
    assert out.read_bytes() == b"written by someone else meanwhile" and _dir(out) == ["m.gguf"]


def test_part_of_a_killed_conversion_is_removed_and_a_live_ones_kept(tiny_ckpt, tmp_path, reference):
    out = tmp_path / "m.gguf"
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        part_name(out, gone.pid).write_bytes(b"half a model")
        part_name(out, alive.pid).write_bytes(b"a conversion still running")
        converter.convert(tiny_ckpt, out, FTYPE, progress=False)
        assert _dir(out) == sorted(["m.gguf", part_name(out, alive.pid).name])
    finally:
        alive.kill()
        alive.wait()
    assert out.read_bytes() == reference


def _start(tiny_ckpt, out: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "runtime.cli", "convert", str(tiny_ckpt), str(out), "--type", FTYPE,
                             "--no-progress", *extra], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)


def _interrupt(tiny_ckpt, out: Path, sig: int, delay: float, after_part: bool, *extra: str) -> str:
    """Start a conversion, wait `delay` s (counted from when its .part appears if `after_part`), send `sig`.

    Returns the phase the signal hit: 'startup' (its .part not made yet), 'writing' or 'finished'.
    """
    proc = _start(tiny_ckpt, out, *extra)
    if after_part:
        deadline = time.monotonic() + 120
        while not part_name(out, proc.pid).exists():
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline
            time.sleep(0.005)
    time.sleep(delay)
    phase = "writing" if part_name(out, proc.pid).exists() else "startup"
    proc.send_signal(sig)
    rc = proc.wait(timeout=120)
    err = proc.stderr.read().decode()
    if out.exists():  # it renamed before the signal landed: the caller checks the bytes
        return "finished"
    if phase == "writing":
        assert "Traceback" not in err, err
        if sig != signal.SIGKILL:
            want = (130, "interrupted") if sig == signal.SIGINT else (143, "terminated")  # 128 + the signal
            assert rc == want[0] and want[1] in err, (rc, err)
            assert not part_name(out, proc.pid).exists(), "Ctrl-C/SIGTERM must remove the .part"
    # phase 'startup': a Ctrl-C while Python itself imports the CLI prints Python's own KeyboardInterrupt
    return phase


def _check_after_kills_then_convert_again(tiny_ckpt, out: Path, reference: bytes, phases: list[str],
                                          in_process: bool) -> None:
    if out.exists():  # only a run that finished before its signal may leave the final name
        assert out.read_bytes() == reference
        out.unlink()
    # a SIGKILLed run's complete tensors are kept for --resume (a plain run refuses to discard
    # them: test_a_plain_run_keeps_an_interrupted_conversions_work), and resuming finishes it
    if in_process:
        converter.convert(tiny_ckpt, out, FTYPE, progress=False, resume=True)
    else:
        proc = _start(tiny_ckpt, out, "--resume")
        assert proc.wait(timeout=300) == 0, proc.stderr.read().decode()
    assert out.read_bytes() == reference, "a repeated conversion must give byte-identical output"
    assert _dir(out) == ["m.gguf"], f"leftovers after the repeated conversion: {_dir(out)} (phases {phases})"


def test_interrupted_conversions_leave_nothing_under_the_final_name(tiny_ckpt, tmp_path, reference):
    """One kill of each kind, each timed to land while the file is being written."""
    out = tmp_path / "m.gguf"
    rng = random.Random(12)
    phases = []
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):
        # the tiny file is written within a fraction of a second once its .part appears (on a quiet
        # machine all three kills of 0-0.6 s missed it): the delays must land inside that
        phases.append(_interrupt(tiny_ckpt, out, sig, rng.uniform(0.0, 0.08), after_part=True))
        assert not out.exists() or out.read_bytes() == reference
        if out.exists():  # it finished before the signal: the next run must start without it (no --force)
            out.unlink()
    assert "writing" in phases, phases
    _check_after_kills_then_convert_again(tiny_ckpt, out, reference, phases, in_process=True)


@pytest.mark.slow
def test_kills_at_random_moments_over_the_whole_run(tiny_ckpt, tmp_path, reference):
    """Half the kills at a random moment of the whole run, half at a random moment of its writing."""
    out = tmp_path / "m.gguf"
    t0 = time.monotonic()
    proc = _start(tiny_ckpt, out)
    while proc.poll() is None and not part_name(out, proc.pid).exists():
        time.sleep(0.005)
    t_part = time.monotonic()
    assert proc.wait(timeout=300) == 0
    whole, writing = time.monotonic() - t0, time.monotonic() - t_part
    out.unlink()
    rng = random.Random(int(os.environ.get("STEPSTREAM_KILL_SEED", "13")))
    phases = []
    for k in range(int(os.environ.get("STEPSTREAM_KILL_ROUNDS", "12"))):
        sig = (signal.SIGINT, signal.SIGTERM, signal.SIGKILL)[k % 3]
        in_writing = k % 2 == 1
        delay = rng.uniform(0.0, (writing if in_writing else whole) * 1.05)
        # --force: a SIGKILLed run's complete tensors are kept for --resume, and a plain run would
        # refuse to discard them; these runs start over each time
        phases.append(_interrupt(tiny_ckpt, out, sig, delay, in_writing, "--force"))
        if out.exists():
            assert out.read_bytes() == reference
            out.unlink()
    print(f"{len(phases)} kills over a {whole:.1f} s run ({writing:.1f} s writing): " +
          ", ".join(f"{p} {phases.count(p)}" for p in ("startup", "writing", "finished")))
    _check_after_kills_then_convert_again(tiny_ckpt, out, reference, phases, in_process=False)


@pytest.mark.parametrize("where", ["missing", "no-file-can-be-made", "directory"])
def test_an_unwritable_summary_json_is_refused_before_converting(tiny_ckpt, tmp_path, capsys, monkeypatch, where):
    out = tmp_path / "m.gguf"
    summary = {"missing": tmp_path / "nope" / "s.json", "directory": tmp_path,
               "no-file-can-be-made": tmp_path / "ro" / "s.json"}[where]
    if where == "no-file-can-be-made":  # as /proc is for root: os.access says yes, creating a file fails
        summary.parent.mkdir()
        import tempfile

        def refuse(*a, **k):
            raise PermissionError(13, "Permission denied")
        monkeypatch.setattr(tempfile, "mkstemp", refuse)
    monkeypatch.setattr(converter, "convert", lambda *a, **k: pytest.fail("converted"))
    assert main(["convert", str(tiny_ckpt), str(out), "--summary-json", str(summary), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {summary}"), err
    assert not out.exists()


def test_the_summary_json_replaces_an_old_one_whole(tiny_ckpt, tmp_path, capsys):
    summary = tmp_path / "s.json"
    summary.write_text("old")
    # an existing summary is replaced only with --force, as the output is (test_convert_output_guard)
    assert main(["convert", str(tiny_ckpt), str(tmp_path / "m.gguf"), "--type", FTYPE, "--summary-json", str(summary),
                 "--no-progress", "--force"]) == 0
    import json
    assert json.loads(summary.read_text())["ftype"] == FTYPE
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf", "s.json"]


def test_a_failure_closes_the_progress_bar_before_its_message(tiny_ckpt, tmp_path):
    """A full disk mid-run: the bar was closed by the garbage collector after the error was
    printed, so the error sat at the end of the bar's line and the bar was drawn again below
    it (a review). The bar's line now ends before the error's."""
    script = f"""
import errno, sys
from convert import converter
from runtime.cli import main
write, calls = converter.write_tensor, []
def full_after_two(*a, **kw):
    calls.append(1)
    if len(calls) == 3:
        raise OSError(errno.ENOSPC, "No space left on device")
    return write(*a, **kw)
converter.write_tensor = full_after_two
sys.exit(main(["convert", {str(tiny_ckpt)!r}, {str(tmp_path / "o.gguf")!r}, "--type", "q8_0"]))
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                       cwd=Path(__file__).resolve().parent.parent)
    assert r.returncode == 2, r.stderr
    err = r.stderr
    assert "convert q8_0" in err and "\nerror: " in err, err[-300:]
    assert "convert q8_0" not in err[err.index("\nerror: "):], err[-300:]  # not drawn again after it
    assert err.rstrip().splitlines()[-1].startswith("error: ") and "No space left on device" in err
