"""Shared fixtures: miniature checkpoints and their GGUFs, made once per test session."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("NUMBA_NUM_THREADS", "2")
# GPU kernels run on numba's CUDA simulator unless a run asks for the card (NUMBA_ENABLE_CUDASIM=0).
# Read when numba is first imported, so it is set before any test module imports it.
os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")
# Numba's OpenMP threads spin after each parallel region by default. With several pytest-xdist
# workers on few cores, the spinning threads of one worker take the cores the others need:
# four test files took 92-165 s of wall time spinning, 34 s passive (two cores, `-n 4`).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# A first run's compile helper (runtime.model.precompile) compiles every kernel a model may
# call; a test's `stepstream` process reaches a few of them. The helpers of two tests' processes
# took 103 s of CPU (of the suite's 2,184) for kernels nothing ran. What it compiles is
# checked by tests/test_kernel_cache.py, when it starts by tests/test_precompile_helper.py.
os.environ.setdefault("STEPSTREAM_COMPILE_HELPER", "0")


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    from convert.mini import write_mini

    return write_mini(tmp_path_factory.mktemp("ckpt") / "tiny", "tiny", seed=0)


@pytest.fixture
def linked_ckpt(tiny_ckpt, tmp_path) -> Path:
    """A copy of the tiny checkpoint (shards linked, not copied) whose index and files may be edited."""
    d = tmp_path / "ckpt"
    d.mkdir()
    for p in tiny_ckpt.iterdir():
        if p.suffix == ".safetensors":
            (d / p.name).symlink_to(p)
        else:
            shutil.copy(p, d / p.name)
    return d


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


# The files with the longest runs first (seconds of a cold fresh-clone run at dc7c716: 232, 151,
# 134, 134, 134, 124, 92, 74, 73, 63, 61, 54), the rest in their usual order. pytest-xdist's
# `--dist loadfile` hands out files in collection order, so a long file collected last (the
# server's, the load test's) ran on one worker while the other had nothing left to do.
_LONGEST_FIRST = ("test_quant_formats_llama.py", "test_quant_q8.py", "test_quant_q8_iq.py", "test_server.py",
                  "test_kv_cache_types.py", "test_cuda_kernels.py", "test_batch_invariance.py",
                  "test_kernel_cache.py", "test_gpu_ops.py", "test_server_load.py", "test_cold_start.py",
                  "test_hardening_cli.py")


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(_LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file's tests stay together
