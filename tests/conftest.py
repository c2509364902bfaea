"""Shared fixtures: miniature checkpoints and their GGUFs, made once per test session."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("NUMBA_NUM_THREADS", "2")
# GPU kernels run on numba's CUDA simulator unless a run asks for the card (NUMBA_ENABLE_CUDASIM=0).
# Read when numba is first imported, so it is set before any test module imports it.
os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")
# Numba's OpenMP threads spin after each parallel region by default. With several pytest-xdist
# workers on few cores, the spinning threads of one worker take the cores the others need:
# four test files took 92-165 s of wall time spinning, 34 s passive (two cores, four workers).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def pytest_sessionstart(session):
    """On the controller of a run with pytest-xdist workers, before it starts them (xdist starts
    them in its own, last, sessionstart): compile the kernels that most test files share, once
    (tests/helpers/warm_kernels.py). On a cold cache the workers would otherwise all compile
    them at once, each on its own. A failure here only means the workers compile them."""
    config = session.config
    if hasattr(config, "workerinput") or not getattr(config.option, "numprocesses", None) or config.option.collectonly:
        return
    r = subprocess.run([sys.executable, "-m", "tests.helpers.warm_kernels"], cwd=config.rootpath,
                       stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=1200)
    if r.returncode != 0:
        print(f"tests/helpers/warm_kernels.py failed (the workers compile its kernels):\n{r.stderr[-2000:]}",
              file=sys.stderr)


# The files that take longest on a cold cache (most of it Numba compiles), longest first, from
# a fresh clone's run (--durations=0, summed per file, seconds): 286, 182, 123, 117, 110, 101,
# 78, 67, 66, 64, 64, 55, 52, 46, 46. With --dist loadfile, xdist hands out whole files in
# the collection's order; by default it first sorts them by their number of tests, which
# puts these few-test, long files last, where one of them runs alone while the other
# workers have finished. Longest first, the workers finish together. Only the order of
# files changes (never that of the tests in a file), and a stale list costs time, not results.
LONGEST_FILES = ("test_quant_formats_llama.py", "test_quant_q8.py", "test_quant_q8_iq.py", "test_cold_start.py",
                 "test_kv_cache_types.py", "test_quant_q8_formats.py", "test_convert_mixes.py",
                 "test_cuda_kernels.py", "test_kernel_cache.py", "test_gpu_ops.py", "test_server_load.py",
                 "test_hardening_gguf.py", "test_batch_invariance.py", "test_quant_kernels.py",
                 "test_hardening_cli.py")


def pytest_configure(config):
    if hasattr(config.option, "loadscopereorder"):  # pytest-xdist: keep the order set below
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    from convert.mini import write_mini

    return write_mini(tmp_path_factory.mktemp("ckpt") / "tiny", "tiny", seed=0)


_GGUF_CACHE: dict[str, Path] = {}


@pytest.fixture(scope="session")
def tiny_gguf(tiny_ckpt, tmp_path_factory):
    """tiny_gguf(ftype) -> path of the tiny checkpoint converted to that type (cached)."""
    from convert.converter import convert

    out_dir = tmp_path_factory.mktemp("gguf")

    def get(ftype: str) -> Path:
        if ftype not in _GGUF_CACHE:
            path = out_dir / f"tiny-{ftype}.gguf"
            convert(tiny_ckpt, path, ftype, progress=False)
            _GGUF_CACHE[ftype] = path
        return _GGUF_CACHE[ftype]

    return get
