"""`stepstream mini` on a full disk and under SIGTERM (review 8: a traceback and exit 1 on a full
file system; SIGTERM left OUT.part, 416 MB of the stress preset, until the next `mini` to the
same name). Now one line and exit 2, status 143, and nothing left behind either way."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path


import runtime
from tests.helpers.full_fs import full_tmpfs

ROOT = Path(runtime.__file__).resolve().parent.parent


def _mini(out: Path, preset: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "runtime.cli", "mini", str(out), "--preset", preset],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)


def test_a_full_disk_is_one_line_and_leaves_nothing(tmp_path):
    with full_tmpfs(tmp_path / "small", size="600k") as d:
        p = _mini(d / "x", "tiny")
        out, err = p.communicate(timeout=300)
        assert p.returncode == 2, err
        assert "Traceback" not in err
        assert err.strip().splitlines()[-1].startswith(f"error: {d / 'x'}: cannot write the checkpoint: No space left")
        assert [f.name for f in d.iterdir()] == ["fill"]


def test_sigterm_leaves_no_partial_checkpoint(tmp_path):
    out = tmp_path / "st"
    p = _mini(out, "stress")
    part = tmp_path / "st.part"
    deadline = time.monotonic() + 120
    while not (part.exists() and any(part.glob("*.safetensors"))):  # under way: writing shards
        assert p.poll() is None and time.monotonic() < deadline, p.communicate()[1][-2000:]
        time.sleep(0.02)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 143, err
    assert "Traceback" not in err and err.strip().splitlines()[-1] == "terminated"
    assert not part.exists() and not out.exists()
