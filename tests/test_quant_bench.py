"""python -m quant.bench: its parts run and print the figures the issue asks for."""

import re

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from quant import bench
from quant import int8_kernels as q8kernels


def test_read_bandwidth_is_positive():
    assert bench.read_bandwidth(nbytes=8 * 2**20, reps=2) > 1e8


def test_make_set_builds_distinct_matrices_of_the_asked_shapes():
    mats = bench.make_set(T.Q8_0, [(64, 256), (256, 64)], copies=2)
    assert [(m.rows, m.cols) for m in mats] == [(64, 256), (256, 64)] * 2
    assert not np.shares_memory(mats[0].data, mats[2].data)


@pytest.mark.slow
def test_bench_set_prints_rate_bandwidth_and_ratio(capsys):
    mats = bench.make_set(T.Q4_K, [(64, 512)], copies=3)
    bench.bench_set("experts", mats, reps=2, bw=10e9, tokens=(4,))
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("Q4_K   experts   GEMV n=1") and "read  10.00 GB/s" in lines[0] and "ratio" in lines[0]
    assert "GEMM n=4" in lines[1] and "x GEMV time" in lines[1]
    # the int8-activation rows: a GEMV, and a GEMM timed against it where the host has one
    assert lines[2].startswith("Q4_K   experts   GEMV q8 n=1") and "x GEMV time" not in lines[2]
    want = 3
    if T.Q4_K in q8kernels.GEMM_FORMATS:
        assert "GEMM q8 n=4" in lines[3] and "x GEMV time" in lines[3]
        want = 4
    assert len(lines) == want, lines


def test_make_set_gives_formats_without_a_quantizer_random_codes_at_a_moderate_scale():
    from gguf.quants import dequantize

    for qtype in bench.RANDOM_FIELDS:
        (m,) = bench.make_set(qtype, [(64, 512)], copies=1)
        w = dequantize(m.data, qtype)
        assert np.isfinite(w).all() and 0 < np.abs(w).max() < 100, qtype.name
        assert len(np.unique(m.data)) > 200  # random codes


def test_main_refuses_a_weight_set_that_fits_in_cache():
    with pytest.raises(SystemExit, match="raise --experts"):
        bench.main(["--formats", "Q4_K", "--experts", "1", "--reps", "1"])


@pytest.mark.parametrize("args, words", [
    (["--threads", "99"], r"--threads 99: choose 1\.\.\d+"),
    (["--formats", "q4_k_m"], r"'q4_k_m' is no GGUF tensor type with kernels here .* not a file type such as Q4_K_M"),
    (["--formats", "Q4_K,NOPE"], r"'NOPE' is no GGUF tensor type"),
    (["--reps", "0"], r"--reps 0: must be at least 1"),
    (["--experts", "-1"], r"--experts -1: must be at least 1"),
    (["--sets", "expert"], r"--sets 'expert': choose among experts, attention"),
])
def test_options_that_would_fail_or_time_nothing_are_usage_errors(capsys, args, words):
    """--threads past the cores, a file type for --formats and a misspelt --sets ended in a
    traceback or printed nothing; --reps 0 printed nan rows (a review)."""
    with pytest.raises(SystemExit) as e:
        bench.main(args)
    assert e.value.code == 2 and re.search(words, capsys.readouterr().err)
