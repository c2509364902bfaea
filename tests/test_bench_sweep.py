"""`stepstream bench --sweep-ram`: caps, the order of the runs, the report and its plot, and one
real sweep of both engines on the shipped miniature under cgroup-v1 caps.

The real sweep needs a writable memory cgroup (root, cgroup v1) and is skipped without one.
"""

from __future__ import annotations

import json
import mmap
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.helpers.full_fs import full_tmpfs
from runtime.base.cgroup import CgroupUnavailable, MemoryCap, drop_page_cache
from runtime.base.errors import StepstreamError
from runtime.bench import sweep
from runtime.cli import main

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "runtime" / "data" / "step35-mini-q4_k_m.gguf"
GiB, MiB = 2**30, 2**20


def need_cgroup():
    try:
        with MemoryCap(GiB):
            pass
    except CgroupUnavailable as e:
        pytest.skip(f"no writable memory cgroup here: {e}")


# ---------------------------------------------------------------- caps

def test_caps_are_shares_of_the_file_or_sizes():
    caps = sweep.parse_caps("25%, 35%,6GiB,512MiB,1.5GB")
    assert [c.text for c in caps] == ["25%", "35%", "6GiB", "512MiB", "1.5GB"]
    size = 8_720_000_000
    assert [c.bytes_for(size) for c in caps] == [size // 4, int(size * 0.35), 6 * GiB, 512 * MiB, 1_500_000_000]
    assert sweep.parse_caps("150%")[0].bytes_for(1000) == 1500  # more than the file is a cap too


@pytest.mark.parametrize("text, named", [
    ("0%", "0%"), ("-5%", "-5%"), ("abc%", "abc%"), ("35", "35"), ("0.35", "0.35"), ("6XB", "6XB"),
    ("0GiB", "0GiB"), ("25%,,35%", "empty"), ("", "empty"), ("nan%", "nan%"), ("inf%", "inf%"),
    ("1e400%", "1e400%"),
])
def test_a_bad_cap_is_one_line_naming_it(text, named):
    with pytest.raises(StepstreamError) as e:
        sweep.parse_caps(text)
    msg = str(e.value)
    assert "\n" not in msg and named in msg
    if text in ("nan%", "inf%", "1e400%"):  # not "must be more than 0%", which an infinite share is
        assert "is not a finite percentage" in msg, msg


def test_a_bad_cap_on_the_command_line_exits_2_with_one_line(capsys):
    assert main(["bench", "-m", str(MODEL), "--sweep-ram", "25%,0.5"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "'0.5' has no unit" in err


def test_flags_that_set_the_ram_themselves_are_refused(capsys, tmp_path):
    out = str(tmp_path / "s")
    assert main(["bench", "-m", str(MODEL), "--sweep-ram", "50%", "--ram-budget", "1GiB", "--sweep-out", out]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--ram-budget does not go with --sweep-ram" in err
    assert main(["bench", "-m", str(MODEL), "--sweep-ram", "50%", "--sweep-out", str(tmp_path / "no" / "s")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["bench", "-m", str(MODEL), "--sweep-ram", "50%", "-ctk", "q8_0", "--sweep-out", out]) == 2
    assert "--cache-type-k/-v do not go with --sweep-ram" in capsys.readouterr().err
    # -c was accepted and ignored (a review): the sweep sizes both engines' contexts itself
    for c in ("4096", "0"):
        assert main(["bench", "-m", str(MODEL), "--sweep-ram", "50%", "-c", c, "--sweep-out", out]) == 2
        assert "-c/--ctx-size does not go with --sweep-ram: both engines' contexts hold the prompt" in \
            capsys.readouterr().err


# ---------------------------------------------------------------- order of the runs

def test_engines_alternate_within_each_cap():
    got = sweep.schedule(2, ("stepstream", "llama.cpp"), 3)
    expected = []
    for cap in (0, 1):  # written out: every repetition runs ours then llama.cpp before the next one
        for rep in (0, 1, 2):
            expected += [(cap, "stepstream", rep), (cap, "llama.cpp", rep)]
    assert got == expected
    assert sweep.schedule(1, ("stepstream",), 2) == [(0, "stepstream", 0), (0, "stepstream", 1)]


# ---------------------------------------------------------------- the report

def _ok(decode, prefill, peak, usage, read):
    return {"status": "ok", "decode_tok_s": decode, "prefill_tok_s": prefill, "peak_rss_bytes": peak,
            "cgroup_max_usage": usage, "bytes_read": read, "bytes_read_timed": read // 2}


def fake_report(tmp_path) -> dict:
    """Three caps: every run fine; one llama.cpp run OOM-killed; ours does not fit, llama.cpp fails."""
    opts = sweep.SweepOptions(model=str(tmp_path / "m.gguf"), caps=tuple(sweep.parse_caps("25%,55%,100%")),
                              repeats=3, n_gen=16, n_prompt=32, threads=2)
    fit = {"status": "does not fit", "minimum_bytes": 3 * GiB, "reason": "needs a cap of 3.0 GiB"}
    oom = {"status": "failed", "reason": "killed by the memory cap (OOM)", "cgroup_max_usage": GiB}
    caps = [
        {"cap": "25%", "cap_bytes": 2 * GiB, "share_of_file": 0.25, "budget": -1,
         "runs": {"stepstream": [fit] * 3, "llama.cpp": [oom] * 3}},
        {"cap": "55%", "cap_bytes": 4 * GiB, "share_of_file": 0.55, "budget": GiB,
         "runs": {"stepstream": [_ok(10.0, 30.0, 3 * GiB, 4 * GiB - 1, 5 * GiB), _ok(12.0, 31.0, 3 * GiB, 4 * GiB - 2, 6 * GiB),
                                 _ok(11.0, 29.0, 3 * GiB, 4 * GiB - 3, 7 * GiB)],
                  "llama.cpp": [_ok(2.0, 5.0, GiB, 3 * GiB, 9 * GiB), oom, _ok(3.0, 6.0, GiB, 3 * GiB, 8 * GiB)]}},
        {"cap": "100%", "cap_bytes": 8 * GiB, "share_of_file": 1.0, "budget": 5 * GiB,
         "runs": {"stepstream": [_ok(20.0 + i, 40.0, 4 * GiB, 6 * GiB, GiB) for i in range(3)],
                  "llama.cpp": [_ok(15.0 - i, 50.0, 7 * GiB, 8 * GiB, 8 * GiB) for i in range(3)]}},
    ]
    return sweep.summarize(opts, 8 * GiB, 900 * MiB, 3 * GiB, caps)


def test_the_report_holds_medians_and_every_run(tmp_path):
    report = fake_report(tmp_path)
    path = tmp_path / "r.json"
    sweep.write_json(report, path)
    back = json.loads(path.read_text())
    assert back == report
    assert {"model", "file_bytes", "engines", "repetitions", "n_prompt", "n_gen", "threads", "footprint_bytes",
            "stepstream_minimum_cap_bytes", "caps"} <= set(back)
    assert [c["cap"] for c in back["caps"]] == ["25%", "55%", "100%"]
    low, mid, full = (c["engines"] for c in back["caps"])
    assert low["stepstream"]["status"] == "does not fit" and low["stepstream"]["minimum_bytes"] == 3 * GiB
    assert low["llama.cpp"]["status"] == "failed" and low["llama.cpp"]["decode_tok_s_median"] is None
    assert low["llama.cpp"]["reasons"] == ["killed by the memory cap (OOM)"]
    # medians over the runs that finished, against statistics.median on the raw numbers
    assert mid["stepstream"]["decode_tok_s_median"] == statistics.median([10.0, 12.0, 11.0])
    assert mid["stepstream"]["decode_tok_s_runs"] == [10.0, 12.0, 11.0]
    assert mid["stepstream"]["prefill_tok_s_median"] == 30.0
    assert mid["stepstream"]["bytes_read_median"] == 6 * GiB
    assert mid["stepstream"]["cgroup_max_usage_max"] == 4 * GiB - 1
    assert mid["llama.cpp"]["status"] == "partial" and mid["llama.cpp"]["runs_ok"] == 2
    assert mid["llama.cpp"]["decode_tok_s_median"] == statistics.median([2.0, 3.0])
    assert len(mid["llama.cpp"]["runs"]) == 3
    assert full["llama.cpp"]["decode_tok_s_median"] == 14.0 and full["stepstream"]["status"] == "ok"
    # ratios of the runs that ran one after the other (repetition i of each engine), then their median
    assert back["caps"][0]["decode_ratio_median"] is None
    assert back["caps"][1]["decode_ratio_median"] == statistics.median([10.0 / 2.0, 11.0 / 3.0])
    assert back["caps"][2]["decode_ratio_median"] == statistics.median([20 / 15, 21 / 14, 22 / 13])
    table = sweep.table_text(report)
    assert "does not fit" in table.splitlines()[1] or "needs a cap of 3.0 GiB" in table
    assert "2/3 ok; killed by the memory cap (OOM)" in table


def test_the_plot_is_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "sweep.png"
    assert sweep.write_plot(fake_report(tmp_path), path) is None
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_without_matplotlib_the_plot_is_one_line_of_advice(tmp_path, monkeypatch):
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)  # an import of it raises ImportError
    path = tmp_path / "sweep.png"
    hint = sweep.write_plot(fake_report(tmp_path), path)
    assert hint == sweep.PLOT_HINT and "pip install 'stepstream[plot]'" in hint and "\n" not in hint
    assert not path.exists()


# ---------------------------------------------------------------- children

def test_page_cache_residency_is_measured(tmp_path):
    path = tmp_path / "f.bin"
    size = 3 * mmap.PAGESIZE + 100
    path.write_bytes(os.urandom(size))
    seen = []
    for _ in range(3):  # the kernel may reclaim a page between the read and the count (DAMON does here)
        path.read_bytes()
        seen.append(sweep.cached_bytes(str(path)))
        if seen[-1] == 4 * mmap.PAGESIZE:  # every page, the last one partly used
            break
    assert seen[-1] == 4 * mmap.PAGESIZE, seen
    drop_page_cache(path)
    assert sweep.cached_bytes(str(path)) == 0


def test_a_failing_child_is_reported_not_raised(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all" * 100)
    opts = sweep.SweepOptions(model=str(bad), caps=(), n_prompt=4, n_gen=2, threads=1)
    res = sweep.run_child(opts.spec("stepstream", 64 * MiB), None, timeout=300)
    assert res["status"] == "failed" and "bad.gguf" in res["reason"] and "\n" not in res["reason"]
    # A timeout: a run that cannot end in 0.3 s (a valid model, 3,000 decoded tokens: over a
    # second at llama.cpp's 2,500 tok/s on this model). The bad file, or 100 tokens, end faster
    # than 0.3 s on a quiet machine, so they cannot stand in for a slow run.
    slow = sweep.SweepOptions(model=str(MODEL), caps=(), n_prompt=512, n_gen=3000, threads=1)
    res = sweep.run_child(slow.spec("llama.cpp"), None, timeout=0.3)
    assert res == {**res, "status": "failed", "reason": "timed out after 0.3 s"}


@pytest.mark.slow  # five child processes: 34 s on two loaded cores, minutes while a disk-bound job runs beside it
def test_a_real_sweep_on_the_shipped_model(tmp_path, monkeypatch, capsys):
    """Two caps, both engines: at 30% of the 13 MiB file (4 MiB) ours does not fit and llama.cpp is
    OOM-killed, and the sweep goes on; at 600 MiB both decode. Without matplotlib the JSON is written
    and the plot is one line of advice."""
    need_cgroup()
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)
    prefix = tmp_path / "sweep"
    assert main(["bench", "-m", str(MODEL), "--sweep-ram", "30%,600MiB", "--llama-cpp", "-n", "4", "-p", "8",
                 "-t", "2", "--sweep-out", str(prefix), "--sweep-timeout", "300"]) == 0
    out = capsys.readouterr().out
    progress = [line for line in out.splitlines() if line.startswith("[")]
    assert [re.match(r"\[\d/4\] cap (\S+) \(.*?\) (\S+) run 1/1: ", line).groups() for line in progress] == [
        ("30%", "stepstream"), ("30%", "llama.cpp"), ("600MiB", "stepstream"), ("600MiB", "llama.cpp")]
    assert "pip install 'stepstream[plot]'" in out and "Traceback" not in out
    assert not (tmp_path / "sweep.png").exists()
    report = json.loads((tmp_path / "sweep.json").read_text())
    size = MODEL.stat().st_size
    tiny, roomy = report["caps"]
    assert tiny["cap_bytes"] == int(size * 0.30) and roomy["cap_bytes"] == 600 * MiB
    ours = tiny["engines"]["stepstream"]
    assert ours["status"] == "does not fit" and ours["minimum_bytes"] > tiny["cap_bytes"]
    assert ours["minimum_bytes"] == report["stepstream_minimum_cap_bytes"]
    small, slots = sweep.smallest_cache(str(MODEL))
    assert ours["minimum_bytes"] == report["footprint_bytes"] + report["margin_bytes"] + small
    llama = tiny["engines"]["llama.cpp"]["runs"][0]
    assert llama["status"] == "failed" and "OOM" in llama["reason"] and llama["oom_kills"] >= 1
    assert llama["cgroup_max_usage"] <= tiny["cap_bytes"]
    for engine in ("stepstream", "llama.cpp"):
        run = roomy["engines"][engine]["runs"][0]
        assert run["status"] == "ok", run
        assert run["decode_tok_s"] > 0 and run["prefill_tok_s"] > 0
        assert 0 < run["cgroup_max_usage"] <= 600 * MiB
        assert roomy["engines"][engine]["decode_tok_s_median"] == run["decode_tok_s"]
    assert roomy["engines"]["stepstream"]["runs"][0]["cache_slots"] >= slots


# ---------------------------------------------------------------- interrupted, and where the outputs go

def _groups_of(pid: int) -> list[Path]:
    return sorted(Path("/sys/fs/cgroup/memory").glob(f"stepstream-{pid}-*"))


def _clean(group: MemoryCap) -> None:
    """Whatever the code under test left: kill the group's processes and remove it."""
    for pid in [int(p) for p in (group.path / "cgroup.procs").read_text().split()] if group.path.exists() else []:
        os.kill(pid, signal.SIGKILL)
    for _ in range(100):
        try:
            group.path.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.05)


IGNORES_SIGINT = "import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); time.sleep(60)"


def test_ctrl_c_kills_and_waits_for_the_child_and_removes_the_group():
    """A real SIGINT to this process while its child (which ignores it, as a child busy in a
    kernel loop does for a while) runs under the cap: the child is killed and reaped, and the
    group is gone when the `with` block ends."""
    need_cgroup()
    group = MemoryCap(GiB)
    fired = threading.Event()

    def ctrl_c():
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not (group.path / "cgroup.procs").exists():
            time.sleep(0.01)
        while time.monotonic() < deadline and not (group.path / "cgroup.procs").read_text().split():
            time.sleep(0.01)
        fired.set()
        os.kill(os.getpid(), signal.SIGINT)

    if threading.current_thread() is not threading.main_thread():
        pytest.skip("a signal handler can only be set in the main thread")
    # as a terminal's Ctrl-C would arrive: an xdist worker runs with SIGINT ignored
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    threading.Thread(target=ctrl_c, daemon=True).start()
    try:
        with pytest.raises(KeyboardInterrupt):
            with group:
                group.run([sys.executable, "-c", IGNORES_SIGINT], capture_output=True, text=True, timeout=60)
        assert fired.is_set()
        assert not group.path.exists()
    finally:
        signal.signal(signal.SIGINT, previous)
        _clean(group)


def test_a_process_the_child_started_is_killed_with_it():
    """The child times out and is killed; what it started is still in the group, and is killed too."""

    need_cgroup()
    group = MemoryCap(GiB)
    try:
        with group:
            with pytest.raises(subprocess.TimeoutExpired):
                group.run(["sh", "-c", "sleep 60 & wait"], timeout=0.5)
        assert not group.path.exists()
    finally:
        _clean(group)


def test_groups_of_dead_sweeps_are_removed_by_the_next():
    need_cgroup()

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    root = Path("/sys/fs/cgroup/memory")
    stale = root / f"stepstream-{child.pid}-0123abcd"  # a sweep killed with SIGKILL left it
    alive = root / f"stepstream-{os.getppid()}-0123abcd"  # a running process's: kept
    other = root / f"other-{child.pid}-0123abcd"  # not ours: kept
    for p in (stale, alive, other):
        p.mkdir()
    try:
        lines = []
        sweep._check_cgroup(log=lines.append)
        assert not stale.exists() and alive.exists() and other.exists()
        assert len(lines) == 1 and stale.name in lines[0]
    finally:
        for p in (stale, alive, other):
            if p.exists():
                p.rmdir()


def test_a_cap_that_did_not_run_is_never_ok(tmp_path):
    opts = sweep.SweepOptions(model=str(tmp_path / "m.gguf"), caps=tuple(sweep.parse_caps("25%,100%")), repeats=2)
    caps = [{"cap": "25%", "cap_bytes": GiB, "share_of_file": 0.25, "budget": GiB,
             "runs": {"stepstream": [_ok(10.0, 30.0, GiB, GiB, GiB)]}},
            {"cap": "100%", "cap_bytes": 4 * GiB, "share_of_file": 1.0, "budget": 3 * GiB, "runs": {"stepstream": []}}]
    report = sweep.summarize(opts, 4 * GiB, 900 * MiB, 2 * GiB, caps, state="interrupted")
    assert report["state"] == "interrupted"
    assert report["not_run"] == [{"cap": "25%", "engine": "stepstream", "runs": 1},
                                 {"cap": "100%", "engine": "stepstream", "runs": 2}]
    full = report["caps"][1]["engines"]["stepstream"]
    assert full["status"] == "not run" and full["runs_ok"] == 0 and full["decode_tok_s_median"] is None
    table = sweep.table_text(report)
    assert "0/0 ok" not in table and "not run" in table.splitlines()[2]
    assert table.splitlines()[-1] == "interrupted; not run: cap 25% stepstream (1 of 2), cap 100% stepstream (2 of 2)"


@pytest.mark.parametrize("runs_before", [0, 1])
def test_a_sweep_interrupted_before_its_first_run_keeps_the_earlier_report(tmp_path, monkeypatch, capsys, runs_before):
    """`--force` then Ctrl-C before any run ended replaced a complete earlier sweep with a report of
    "not run" alone: nothing measured, everything lost. The earlier report now stays; once a run
    has ended, the interrupted report (which holds it) replaces it, as --force asks."""
    out = tmp_path / "bench-sweep.json"
    out.write_text('{"earlier": "complete"}\n')

    def interrupted(o, log, after_run):
        caps = [{"cap": c.text, "cap_bytes": GiB, "share_of_file": 0.5, "budget": GiB,
                 "runs": {"stepstream": [_ok(10.0, 30.0, GiB, GiB, GiB)] * runs_before}} for c in o.caps]
        if runs_before:
            after_run(sweep.summarize(o, 4 * GiB, 900 * MiB, 2 * GiB, caps))
        after_run(sweep.summarize(o, 4 * GiB, 900 * MiB, 2 * GiB, caps, state="interrupted"))
        raise KeyboardInterrupt

    monkeypatch.setattr(sweep, "run_sweep", interrupted)
    assert main(["bench", "-m", str(MODEL), "--sweep-ram", "50%", "-r", "2", "--sweep-out", str(tmp_path), "--force"]) == 130
    stdout = capsys.readouterr().out
    if runs_before:
        assert json.loads(out.read_text())["state"] == "interrupted" and f"wrote {out}" in stdout
    else:
        assert out.read_text() == '{"earlier": "complete"}\n'
        assert f"interrupted before any run ended: {out} is left as it was" in stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench-sweep.json"]


def test_an_interrupted_sweep_says_so_and_leaves_no_group(tmp_path):
    """Ctrl-C (SIGINT to the sweep's process group, as a terminal sends it) while the first capped
    run is under way: exit 130, no memory group of the sweep left, and the JSON, in the directory
    given as --sweep-out, says it was interrupted and that neither cap ran."""
    need_cgroup()
    out = tmp_path / "results"
    out.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "runtime.cli", "bench", "-m", str(MODEL), "--sweep-ram",
                             "600MiB,700MiB", "-n", "4", "-p", "8", "-t", "1", "--sweep-out", f"{out}/"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            # a Ctrl-C reaches it as a terminal's would: an xdist worker has SIGINT ignored,
                            # and a child inherits that (Python keeps an ignored SIGINT ignored)
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            busy = [g for g in _groups_of(proc.pid) if (g / "cgroup.procs").read_text().split()]
            if busy:
                break
            time.sleep(0.01)
        assert proc.poll() is None, proc.communicate()
        os.killpg(proc.pid, signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        left = _groups_of(proc.pid)
        for g in left:
            _clean(MemoryCap(0, name=g.name))
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and "interrupted" in stderr
    assert left == []
    assert sorted(p.name for p in out.iterdir()) == ["bench-sweep.json"]
    report = json.loads((out / "bench-sweep.json").read_text())
    assert report["state"] == "interrupted"
    assert report["not_run"] == [{"cap": "600MiB", "engine": "stepstream", "runs": 1},
                                 {"cap": "700MiB", "engine": "stepstream", "runs": 1}]
    assert {c["engines"]["stepstream"]["status"] for c in report["caps"]} == {"not run"}
    assert "interrupted; not run: cap 600MiB stepstream (1 of 1), cap 700MiB stepstream (1 of 1)" in stdout


@pytest.mark.parametrize("given, expected", [("DIR", "DIR/bench-sweep"), ("DIR/", "DIR/bench-sweep"),
                                             ("DIR/s", "DIR/s"), ("DIR/s.json", "DIR/s"), ("DIR/new/", "DIR/new/bench-sweep")])
def test_a_directory_as_sweep_out_means_bench_sweep_in_it(tmp_path, given, expected):
    got = sweep.output_paths(given.replace("DIR", str(tmp_path)))
    want = expected.replace("DIR", str(tmp_path))
    assert got == (Path(want + ".json"), Path(want + ".png"))


@pytest.mark.parametrize("existing", ["bench-sweep.json", "bench-sweep.png"])
def test_an_earlier_sweeps_output_is_kept_unless_forced(tmp_path, capsys, existing):
    earlier = tmp_path / existing
    earlier.write_text("an hour of measurements")
    assert main(["bench", "-m", str(MODEL), "--sweep-ram", "50%", "--sweep-out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(earlier) in err and "already exists" in err and "--force" in err, err
    assert earlier.read_text() == "an hour of measurements"
    assert sweep.output_paths(str(tmp_path), force=True)[0] == tmp_path / "bench-sweep.json"


def test_an_unreadable_cap_names_the_flag(capsys):
    assert main(["bench", "-m", str(MODEL), "--sweep-ram", "abc"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--sweep-ram" in err and "'abc'" in err, err


def test_a_sweep_where_no_cap_can_run_is_refused(tmp_path, capsys):
    """1 MiB is below what stepstream needs (measured by the uncapped footprint run): nothing
    would run, so the sweep says so in one line, exits 2 and writes nothing."""
    need_cgroup()
    rc = main(["bench", "-m", str(MODEL), "--sweep-ram", "1MiB", "-n", "2", "-p", "4", "-t", "1",
               "--sweep-out", str(tmp_path / "s")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0 and "no cap can run stepstream" in err and "1MiB" in err, err
    assert list(tmp_path.iterdir()) == []


def test_force_without_a_sweep_is_refused(capsys):
    """--force only lets a sweep replace its outputs; without --sweep-ram it was accepted and ignored."""
    assert main(["bench", "-m", str(MODEL), "--force"]) == 2
    assert capsys.readouterr().err.strip() == \
        "error: --force goes with --sweep-ram (it lets a sweep replace an earlier sweep's JSON and PNG)"


def test_a_new_directory_ending_in_a_slash_is_made_before_any_run(tmp_path):
    """The help's "a path ending in /": the sweep's outputs go into it, made if new (it was refused
    when the results were first written, after the first run)."""
    out = tmp_path / "a" / "b"
    assert sweep.output_paths(f"{out}/") == (out / "bench-sweep.json", out / "bench-sweep.png")
    assert out.is_dir()


@pytest.mark.parametrize("flag, value", [("--sweep-out", "x/"), ("--sweep-timeout", "60")])
def test_sweep_flags_without_a_sweep_are_refused(tmp_path, monkeypatch, capsys, flag, value):
    """A plain bench would have run and ignored them."""
    import runtime.cli.bench as bench

    monkeypatch.setattr(bench, "load_model", lambda *a, **k: pytest.fail("loaded"))
    monkeypatch.chdir(tmp_path)
    assert main(["bench", "-m", str(MODEL), "-p", "8", "-n", "2", flag, value]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {flag} goes with --sweep-ram (a plain bench writes no sweep and runs no child)", err
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def full_dir(tmp_path):
    """A real file system with a few KiB free (a tmpfs filled up): skipped where mounting is not allowed."""
    with full_tmpfs(tmp_path / "small", size="600k", leave=2048) as d:
        yield d


@pytest.mark.slow  # two child processes
def test_a_disk_that_fills_during_a_sweep_is_one_line_and_the_results_are_printed(full_dir, capsys):
    """Review 8: a traceback (exit 1) from write_json after the first run, the measured runs lost.
    Now every run still runs, the table is printed, one error line names the file, exit 2, and no
    temporary file is left."""
    need_cgroup()
    code = main(["bench", "-m", str(MODEL), "--sweep-ram", "300MiB,400MiB", "-n", "4", "-p", "8", "-t", "2",
                 "--sweep-out", str(full_dir / "sw"), "--sweep-timeout", "300"])
    out = capsys.readouterr()
    assert code == 2
    assert "Traceback" not in out.out + out.err
    rows = [line.split() for line in out.out.splitlines() if line.strip().startswith(("300MiB", "400MiB"))]
    assert [r[0] for r in rows] == ["300MiB", "400MiB"] and all(r[-1] == "ok" for r in rows), out.out
    assert out.err.strip().splitlines()[-1] == (f"error: {full_dir / 'sw.json'}: cannot write the sweep results: No "
                                                "space left on device; the table above holds the sweep's results")
    assert sorted(p.name for p in full_dir.iterdir()) == ["fill"]


def test_a_sweep_whose_every_run_failed_exits_2(tmp_path, capsys, monkeypatch):
    """A review's sweep on a synth file: every stepstream run was refused by the loader (its
    budget check counted the runtime's memory at more than the sweep had measured), the table held
    only dashes, and the command exited 0. The runs here fail as a child that cannot load does."""
    need_cgroup()
    real = sweep.run_child

    def failing(spec, cap, timeout):
        if cap is None:  # the uncapped probe that measures the footprint
            return real(spec, cap, timeout)
        return {"status": "failed", "reason": "MODEL: a RAM budget of 1 MiB needs 2 MiB"}

    monkeypatch.setattr(sweep, "run_child", failing)
    code = main(["bench", "-m", str(MODEL), "--sweep-ram", "300MiB,400MiB", "-n", "4", "-p", "8", "-t", "2",
                 "--sweep-out", str(tmp_path / "sw"), "--sweep-timeout", "300"])
    out = capsys.readouterr()
    assert code == 2 and "Traceback" not in out.out + out.err
    assert out.err.strip().splitlines()[-1] == ("error: --sweep-ram: every run failed (2 of 2): MODEL: a RAM budget "
                                                "of 1 MiB needs 2 MiB")
    assert json.loads((tmp_path / "sw.json").read_text())["state"] == "complete"  # the results are kept


def test_sweep_children_wait_passively_unless_told_otherwise(tmp_path, capsys, monkeypatch):
    """A review: libgomp's default waits (chosen from a 0.2 s load sample at the start, 4 times in
    10 on a shared host) gave 3.4 / 4.0 tok/s where PASSIVE gave 20.6 / 15.2 under the same caps."""
    need_cgroup()
    seen = []

    def child(spec, cap, timeout):
        seen.append(os.environ.get("OMP_WAIT_POLICY"))
        return {"status": "failed", "reason": "stopped here"}

    monkeypatch.setattr(sweep, "measure_footprint", lambda o, smallest: 64 * MiB)
    monkeypatch.setattr(sweep, "run_child", child)
    for given, expected in ((None, "PASSIVE"), ("ACTIVE", "ACTIVE")):
        if given is None:
            monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
        else:
            monkeypatch.setenv("OMP_WAIT_POLICY", given)
        seen.clear()
        main(["bench", "-m", str(MODEL), "--sweep-ram", "300MiB", "-n", "4", "-p", "8", "-t", "2",
              "--sweep-out", str(tmp_path / f"sw{given}"), "--sweep-timeout", "300"])
        assert seen == [expected], (given, seen)
    capsys.readouterr()


def test_an_asked_budget_can_be_a_ceiling():
    """The sweep's budgets come from a measured footprint; with ram_budget_fit the loader takes the
    largest budget its start check allows instead of refusing one a little over it."""
    from offload.placement import RuntimeNeeds, choose_budget
    from runtime.base.memory_limit import MemoryLimit

    limit = MemoryLimit("cgroup v1", 0, 0, 0)
    needs = RuntimeNeeds(start=100, full=200, n_ctx=64)
    args = ("m.gguf", 1000, 950, limit, 500, needs, 10, 4)  # asked 1000; 950 usable; 500 resident
    with pytest.raises(StepstreamError, match="the largest budget that fits is"):
        choose_budget(*args, all_experts=10_000)
    budget, reason = choose_budget(*args, all_experts=10_000, fit=True)
    assert budget == 950 - 500 - 100 and reason.startswith("asked for")
    assert choose_budget("m.gguf", 300, 950, limit, 500, needs, 10, 4, 10_000, fit=True)[0] == 300  # fits: as asked
