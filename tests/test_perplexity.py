"""`stepstream perplexity` equals llama.cpp's perplexity algorithm run on llama.cpp's own logits."""

import sysconfig
from pathlib import Path

import numpy as np
import pytest

from tests.helpers.llama import llama_cpp_logits
from runtime.cli import main
from runtime.base.errors import StepstreamError
from runtime.loader import load
from runtime.generation.perplexity import chunk_nll, perplexity

TEXT = Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py"


def test_chunk_nll_matches_a_direct_softmax():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((5, 11)).astype(np.float32) * 4
    targets = rng.integers(0, 11, 5)
    p = np.exp(logits.astype(np.float64)) / np.exp(logits.astype(np.float64)).sum(-1, keepdims=True)
    np.testing.assert_allclose(chunk_nll(logits, targets), -np.log(p[np.arange(5), targets]), rtol=1e-12)


def test_ours_matches_llama_cpp_on_the_same_file(tiny_gguf, tiny_ckpt, capsys):
    """llama.cpp's logits carry ~1e-3 of float32 error (its own match to float64); ours track float64."""
    from tests.helpers.reference_model import reference_logits

    path = tiny_gguf("f32")
    model = load(path)
    tokens = model.tokenize(TEXT.read_text(), add_bos=True)
    bos = model.tokenizer.bos_id
    ours = perplexity(lambda ids: model.logits(ids), tokens, 64, bos, n_chunks=3)
    theirs = perplexity(lambda ids: llama_cpp_logits(path, ids), tokens, 64, bos, n_chunks=3)
    exact = perplexity(lambda ids: reference_logits(tiny_ckpt, ids), tokens, 64, bos, n_chunks=3)
    assert ours.n_tokens == theirs.n_tokens == 3 * 31
    assert abs(ours.ppl / exact.ppl - 1) < 1e-4
    assert abs(ours.ppl / theirs.ppl - 1) < 5e-3
    assert main(["perplexity", "-m", str(path), "-f", str(TEXT), "-c", "64", "--chunks", "3"]) == 0
    out = capsys.readouterr().out
    assert f"PPL = {ours.ppl:.4f}" in out


def test_too_short_a_text_is_a_clear_error():
    with pytest.raises(StepstreamError, match="needs at least 128"):
        perplexity(lambda ids: None, list(range(100)), 64, None)


def test_the_running_estimate_is_the_estimate_of_the_chunks_so_far(tiny_gguf):
    """llama-perplexity prints [1]52.70,[2]49.67,... as it goes; ours had no running figure, and
    Ctrl-C threw every finished chunk away. After each chunk the estimate is the final one of a
    run stopped there."""
    model = load(tiny_gguf("f32"))
    tokens = model.tokenize(TEXT.read_text(), add_bos=True)
    bos = model.tokenizer.bos_id
    seen = []
    perplexity(lambda ids: model.logits(ids), tokens, 64, bos, n_chunks=4, progress=lambda i, e: seen.append((i, e)))
    assert [i for i, _ in seen] == [1, 2, 3, 4]
    for i, estimate in seen:
        stopped = perplexity(lambda ids: model.logits(ids), tokens, 64, bos, n_chunks=i)
        assert estimate == pytest.approx(stopped.ppl, rel=1e-12)


def test_ctrl_c_reports_the_estimate_so_far(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    text = tmp_path / "long.txt"
    text.write_text(TEXT.read_text() * 40)
    model = Path(__file__).resolve().parent.parent / "runtime" / "data" / "step35-mini-q4_k_m.gguf"
    p = subprocess.Popen([sys.executable, "-m", "runtime.cli", "perplexity", "-m", str(model), "-f", str(text), "-c",
                          "128"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                         cwd=Path(__file__).resolve().parent.parent)
    try:
        deadline = time.monotonic() + 120
        err = b""
        while b"PPL" not in err and time.monotonic() < deadline:  # the bar shows a running estimate
            err += p.stderr.read1(4096)
        os.killpg(p.pid, signal.SIGINT)
        rest, err2 = p.communicate(timeout=60)
    finally:
        p.kill()
    lines = (err + err2).decode().replace("\r", "\n").splitlines()
    assert p.returncode == 130
    assert lines[-1] == "interrupted" and lines[-2].startswith("interrupted after ") and "estimate so far PPL = " in lines[-2]


def test_the_command_scores_in_blocks_with_the_bits_of_whole_logits_and_a_fraction_of_the_memory():
    """`perplexity` held a chunk's [n_ctx, V] logits and two float64 copies (a review: 750 MiB at
    -c 512 over the real vocabulary, an OOM kill under a cgroup cap); it now scores the second
    half's rows in blocks. The same result to the bit, and a small peak of Python allocations."""
    import tracemalloc

    model = load("runtime/data/step35-mini-q4_k_m.gguf", n_ctx=256, n_threads=1)
    tokens = model.tokenize(TEXT.read_text(), add_bos=True)
    bos = model.tokenizer.bos_id
    peaks = {}
    results = {}
    for name, fn in (("whole", lambda ids: model.logits(ids)),
                     ("blocks", lambda ids: model.scored_logits(ids, len(ids) // 2, rows=13))):
        tracemalloc.start()
        results[name] = perplexity(fn, tokens, 256, bos, n_chunks=2)
        peaks[name] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert results["blocks"] == results["whole"]
    logits_bytes = 256 * model.cfg.vocab * 4
    assert peaks["whole"] - peaks["blocks"] > 2 * logits_bytes, peaks  # a chunk's logits and a float64 copy, at least
