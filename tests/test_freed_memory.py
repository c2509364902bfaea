"""runtime.base.system.keep_freed_memory: after it, temporaries of varied sizes freed and
allocated again come back without page faults (glibc keeps them in its heap); without it, the
kernel faults their pages in again. Each side runs in a fresh process: mallopt is process-wide."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

SCRIPT = textwrap.dedent("""
    import resource, sys
    import numpy as np
    from runtime.base import system
    if sys.argv[1] == "keep":
        assert system.keep_freed_memory()
    elif sys.argv[1] == "load":
        import runtime
        runtime.load(runtime.__path__[0] + "/data/step35-mini-q4_k_m.gguf", n_ctx=64)
    def chunk():  # a prefill chunk's temporaries: sizes that vary, each touched, then freed
        for mb in (1, 24, 3, 16, 8, 30, 2):
            a = np.empty(mb * 2**20, np.uint8)
            a[::4096] = 1
            del a
    chunk()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    chunk()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")


def _faults(mode: str) -> int:
    r = subprocess.run([sys.executable, "-c", SCRIPT, mode], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return int(r.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_temporaries_come_back_without_page_faults():
    plain, kept, loaded = _faults("plain"), _faults("keep"), _faults("load")
    print(f"page faults of a second chunk: {plain} plain, {kept} kept, {loaded} after runtime.load")
    assert plain > 200  # the control: glibc gave the blocks back, and they fault in again
    assert kept < 20 and loaded < 20  # runtime.load keeps them
