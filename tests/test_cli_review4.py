"""Fixes from a review of the command line against llama.cpp's habits: escapes in -p/-r (on by
default in llama.cpp), --repeat-last-n -1, llama-bench's decode-only `-p 0`, Kubernetes' sizes
(6Gi), `plan` on a file `run` refuses, and the demo's prompt beyond its context."""

from __future__ import annotations

from pathlib import Path

import gguf
import pytest

import quant
from runtime.base.units import parse_bytes
from runtime.cli import main
from runtime.generation import complete
from runtime.generation.sampling import SamplingParams
from runtime.loader import load

MODEL = Path(__file__).resolve().parent.parent / "runtime" / "data" / "step35-mini-q4_k_m.gguf"


def _run(capsys, *args) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main(["run", "-m", str(MODEL), "-n", "8", "--temp", "0", "-t", "1", "--mtp", "0", *args])
    out, err = capsys.readouterr()
    return rc, out, err


def test_escapes_in_the_prompt_are_read_as_llama_cpp_reads_them(capsys):
    """`-p 'def f(x):\\n    return'` (a llama.cpp command line) sent a backslash and an n."""
    rc, escaped, _ = _run(capsys, "-p", r"def f(x):\n    return")
    assert rc == 0 and escaped.startswith("def f(x):\n    return")
    rc, real, _ = _run(capsys, "-p", "def f(x):\n    return")
    assert rc == 0 and real == escaped
    rc, literal, _ = _run(capsys, "-p", r"def f(x):\n    return", "--no-escape")
    assert rc == 0 and literal.startswith(r"def f(x):\n    return")
    # \xHH, \t, \\, and a backslash before anything else stays
    rc, out, _ = _run(capsys, "-p", r"a\x41\tb\\n\q", "-n", "1")
    assert rc == 0 and out.startswith("aA\tb\\n\\q")
    # \xHH is a byte, as in llama.cpp's string_process_escapes: UTF-8 written as escapes is the
    # character (it was one code point per byte: "cafÃ©"), and bytes that make no UTF-8 are named
    rc, out, _ = _run(capsys, "-p", r"x = 'caf\xc3\xa9'", "-n", "1")
    assert rc == 0 and out.startswith("x = 'café'")
    rc, _, err = _run(capsys, "-p", r"a\xffb", "-n", "1")
    assert rc == 2 and "not UTF-8 (byte 0xff at offset 1)" in err, err


def test_repeat_last_n_minus_one_is_the_whole_context(capsys):
    prompt = "def parse(line):\n    parts = line.split()\n"
    rc, out, _ = _run(capsys, "-p", prompt, "-n", "24", "--repeat-penalty", "1.5", "--repeat-last-n", "-1",
                      "--no-display-prompt")
    assert rc == 0
    m = load(MODEL, n_threads=1)
    want = "".join(p.text for p in complete(m, m.tokenize(prompt, add_bos=True), SamplingParams(
        temperature=0.0, repeat_penalty=1.5, repeat_last_n=10**6), 24))
    assert out.rstrip("\n") == want.rstrip("\n")
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:  # argparse's refusal, before loading
        main(["run", "-m", str(MODEL), "-p", "x", "--repeat-last-n", "-2"])
    assert e.value.code == 2
    assert "must be 0 or more, or -1 for the whole context, got -2" in capsys.readouterr().err


def test_bench_times_decoding_alone_with_p_0(capsys):
    """llama-bench's decode-only run (`-p 0 -n 128`) was refused: -p must be positive."""
    capsys.readouterr()
    assert main(["bench", "-m", str(MODEL), "-p", "0", "-n", "8", "-t", "1", "--json"]) == 0
    import json

    report = json.loads(capsys.readouterr().out.strip().splitlines()[0])
    assert report["n_prompt"] == 0 and report["prefill_tok_s"] is None and report["decode_tok_s"] > 0
    assert main(["bench", "-m", str(MODEL), "-p", "0", "-n", "0"]) == 2
    assert "nothing to time" in capsys.readouterr().err


@pytest.mark.parametrize("text,value", [("6Gi", 6 * 2**30), ("512Mi", 512 * 2**20), ("6GiB", 6 * 2**30),
                                        ("6g", 6 * 10**9), ("1.5Ki", 1536)])
def test_sizes_take_kubernetes_binary_suffixes(text, value):
    assert parse_bytes(text) == value


def test_plan_refuses_a_file_run_refuses(monkeypatch, capsys):
    """`plan` printed a whole plan for a file whose formats `run` cannot run (a review's Q1_0
    file). The shipped model's Q6_K taken out of the kernels' table stands in for such a format."""
    monkeypatch.delitem(quant.FORMATS, gguf.GGMLQuantizationType.Q6_K)
    capsys.readouterr()
    assert main(["plan", "-m", str(MODEL), "--ram", "8GiB"]) == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert not out and len(lines) == 1 and "stored as Q6_K" in lines[0] and "cannot run" in lines[0], err


def test_the_demo_names_a_prompt_beyond_its_context_by_its_own_flags(capsys):
    """It loaded, echoed the prompt, then failed with the Python API's advice (`n_ctx`)."""
    capsys.readouterr()
    assert main(["demo", "-p", "x = 1\n" * 600, "-n", "4"]) == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert not out and "-p/--prompt: the prompt is" in lines[-1] and "holds 1024" in lines[-1], err
    assert "n_ctx" not in err


def test_stats_count_the_runs_own_expert_requests_not_the_warm_ups(capsys):
    """`run --stats` counted the warm-up's expert requests: a 5-token run under a 1 MiB budget
    showed 238 requests and a 14.7% hit rate, every hit the warm-up's (a review's finding)."""
    from runtime.base.config import ModelConfig
    from runtime.base.gguf_file import GGUFModelFile

    cfg = ModelConfig.from_gguf(GGUFModelFile(MODEL))
    rc, out, err = _run(capsys, "-p", "def", "-n", "5", "--ram-budget", "1MiB", "--no-prefetch", "--stats", "-c", "512")
    assert rc == 0, err
    n_prompt = int(next(l for l in err.splitlines() if l.startswith("[length]")).split()[1])
    moe_layers = sum(cfg.moe[: cfg.n_layers])
    line = next(l for l in err.splitlines() if l.startswith("experts: "))
    evaluated = n_prompt + 5 - 1  # the last token is sampled, never evaluated
    assert int(line.split()[1]) == evaluated * moe_layers * cfg.n_expert_used, (line, n_prompt)
