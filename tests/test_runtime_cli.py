"""The `run`, `chat` and `bench` subcommand modules, driven through their own argument parsers."""

from __future__ import annotations

import argparse
import io
import json

import numpy as np
import pytest

import runtime
from runtime.cli import bench as bench_cli
from runtime.cli import chat as chat_cli
from runtime.cli import run as run_cli
from runtime.base.errors import StepstreamError


def parse(module, argv):
    p = argparse.ArgumentParser()
    module.add_arguments(p)
    return p.parse_args(argv)


@pytest.fixture(scope="module")
def f32_path(tiny_gguf):
    return str(tiny_gguf("f32"))


def test_run_streams_the_greedy_completion(f32_path, capsys):
    args = parse(run_cli, ["-m", f32_path, "-p", "def main():", "-n", "12", "--temp", "0", "-t", "2", "-c", "128"])
    assert run_cli.run(args) == 0
    out, err = capsys.readouterr()
    want = runtime.load(f32_path, n_ctx=128).create_completion("def main():", max_tokens=12, temperature=0)
    assert out == "def main():" + want["choices"][0]["text"] + "\n"
    assert "[length]" in err and "12 generated" in err


def test_run_needs_one_prompt(f32_path):
    with pytest.raises(StepstreamError, match="exactly one"):
        run_cli.run(parse(run_cli, ["-m", f32_path]))


def test_run_reads_a_prompt_file_and_stops_at_reverse_prompt(f32_path, tmp_path, capsys):
    (tmp_path / "p.txt").write_text("import os\n")
    full = runtime.load(f32_path, n_ctx=128).create_completion("import os\n", max_tokens=16, temperature=0)["choices"][0]["text"]
    stop = full[4:6]
    args = parse(run_cli, ["-m", f32_path, "-f", str(tmp_path / "p.txt"), "-n", "16", "--temp", "0",
                           "-r", stop, "--no-display-prompt"])
    run_cli.run(args)
    out, err = capsys.readouterr()
    assert out == full[: full.find(stop)] + "\n" and "[stop]" in err


def test_chat_keeps_the_conversation(f32_path):
    args = parse(chat_cli, ["-m", f32_path, "-n", "4", "--seed", "1", "-sys", "Be brief."])
    out = io.StringIO()
    assert chat_cli.run(args, stdin=io.StringIO("hello\n\nhow are you\n/exit\nignored\n"), stdout=out) == 0
    model = runtime.load(f32_path)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"}]
    # the command line's default temperature (the API's chat default is llama-cpp-python's 0.2)
    first = model.create_chat_completion(messages, max_tokens=4, seed=1, temperature=0.8)["choices"][0]["message"]["content"]
    messages += [{"role": "assistant", "content": first}, {"role": "user", "content": "how are you"}]
    second = model.create_chat_completion(messages, max_tokens=4, seed=1, temperature=0.8)["choices"][0]["message"]["content"]
    assert out.getvalue() == first + "\n" + second + "\n"  # the blank line is skipped, /exit ends it


def test_bench_json(f32_path, capsys):
    args = parse(bench_cli, ["-m", f32_path, "-p", "16", "-n", "4", "-t", "2", "--json"])
    assert bench_cli.run(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["n_prompt"] == 16 and report["n_gen"] == 4 and report["threads"] == 2
    assert report["prefill_tok_s"] > 0 and report["decode_tok_s"] > 0
    assert report["peak_rss_bytes"] > 10 * 2**20


def test_bench_reports_the_threads_that_ran(f32_path, capsys):
    """-t beyond numba's limit was capped for our kernels in silence while llama.cpp got all 64
    (a 20x "ratio" on 2 cores) and the JSON said 64: both engines now get the count that runs."""
    import numba

    args = parse(bench_cli, ["-m", f32_path, "-p", "4", "-n", "2", "-t", "4096", "--json"])
    assert bench_cli.run(args) == 0
    out = capsys.readouterr()
    limit = numba.config.NUMBA_NUM_THREADS
    assert json.loads(out.out)["threads"] == limit
    assert f"-t 4096: the kernels run at most {limit} threads here (NUMBA_NUM_THREADS)\n" in out.err  # one engine
    # `run` capped -t in silence (a review; `convert --threads` refuses such a count): it says so too
    assert run_cli.run(parse(run_cli, ["-m", f32_path, "-p", "x", "-n", "1", "-t", "4096"])) == 0
    assert f"-t 4096: the kernels run at most {limit} threads here (NUMBA_NUM_THREADS)" in capsys.readouterr().err
    for n in ("0", "1"):
        with pytest.raises(StepstreamError, match=f"-n {n} leaves none of; give -n 2 or more"):
            bench_cli.run(parse(bench_cli, ["-m", f32_path, "-p", "4", "-n", n, "--mtp", "1"]))


def test_bench_beside_llama_cpp(f32_path, capsys):
    args = parse(bench_cli, ["-m", f32_path, "-p", "16", "-n", "4", "-t", "1", "--llama-cpp"])
    assert bench_cli.run(args) == 0
    out = capsys.readouterr().out
    assert "stepstream" in out and "llama.cpp" in out and "ratio" in out
    # the engines' repetitions alternate, and each engine's medians are its own runs'
    args = parse(bench_cli, ["-m", f32_path, "-p", "16", "-n", "4", "-t", "1", "-r", "3", "--llama-cpp", "--json"])
    assert bench_cli.run(args) == 0
    report = json.loads(capsys.readouterr().out.splitlines()[0])
    runs = report["runs"]
    assert [r["engine"] for r in runs] == ["stepstream", "llama.cpp"] * 3
    for name, r in (("stepstream", report), ("llama.cpp", report["llama_cpp"])):
        mine = [x for x in runs if x["engine"] == name]
        assert r["prefill_tok_s"] == pytest.approx(16 / np.median([x["prefill_s"] for x in mine]))
        assert r["decode_tok_s"] == pytest.approx(4 / np.median([x["decode_s"] for x in mine]))
        assert r["peak_rss_bytes"] > 10 * 2**20
    # both engines get the context asked for (llama.cpp got -p + -n + 8 whatever -c said)
    # (llama.cpp rounds a context up to a multiple of 256)
    assert report["n_ctx"] == 16 + 4 and report["llama_cpp"]["n_ctx"] == 256
    args = parse(bench_cli, ["-m", f32_path, "-p", "16", "-n", "4", "-t", "1", "-r", "1", "-c", "512", "--llama-cpp",
                             "--json"])
    assert bench_cli.run(args) == 0
    report = json.loads(capsys.readouterr().out.splitlines()[0])
    assert report["n_ctx"] == report["llama_cpp"]["n_ctx"] == 512


def test_bench_says_when_llama_cpp_cannot_run_the_file(tmp_path):
    """A llama.cpp child that dies before reporting is an error naming it, not a hang."""
    bad = tmp_path / "not-a-model.gguf"
    bad.write_bytes(b"GGUF" + bytes(60))
    with pytest.raises(StepstreamError, match="llama.cpp's benchmark process exited"):
        bench_cli.LlamaCppBeside(str(bad), [1, 2, 3], [4], 1, 512)


def test_chat_lines_ending_in_a_backslash_go_on(f32_path, monkeypatch):
    """llama-cli's multi-line input: a line that ends with a backslash goes on on the next (a
    newline in the message); there was no way to send a message of several lines."""
    sent = []
    monkeypatch.setattr(chat_cli, "_reply", lambda conv, text, out: sent.append(text))
    args = parse(chat_cli, ["-m", f32_path, "-n", "2"])
    stdin = io.StringIO("def f(x):\\\n    return x\\\n\nalone\nlast \\")
    assert chat_cli.run(args, stdin=stdin, stdout=io.StringIO()) == 0
    assert sent == ["def f(x):\n    return x", "alone", "last \\"]  # a message ends without its last newline


def test_second_review_of_the_cli_changes(f32_path, capsys, tmp_path):
    """-pHello (argparse's attached value) was refused as an unknown option; perplexity -c 0
    was refused before -c 0 became the model's context; bench -n 0 labelled the warm-up's and
    the prefills' expert statistics "the last repetition's decode"."""
    from runtime.cli import main

    assert main(["run", "-m", f32_path, "-pHello", "-n", "2", "--temp", "0"]) == 0
    assert capsys.readouterr().out.startswith("Hello")
    text = tmp_path / "t.txt"
    text.write_text(open(__file__).read() * 4)
    from runtime.base.config import ModelConfig
    from runtime.base.gguf_file import GGUFModelFile

    full = ModelConfig.from_gguf(GGUFModelFile(f32_path)).context_length
    assert main(["perplexity", "-m", f32_path, "-f", str(text), "-c", "0", "--chunks", "1"]) == 2  # the text is short
    assert f"perplexity with a context of {full} needs at least {2 * full}" in capsys.readouterr().err
    assert main(["bench", "-m", f32_path, "-p", "8", "-n", "0", "-r", "1", "--ram-budget", "4MiB", "--json"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["experts"]["scope"] == "the warm-up and every prefill"


def test_chat_replies_cut_by_the_context_end_their_lines_on_stdout(f32_path, capsys):
    """A reply that filled the context ended its line on stderr only, so replies redirected to a
    file ran together (a review: `... > co.txt` gave two replies on one line)."""
    args = parse(chat_cli, ["-m", f32_path, "-n", "-1", "--temp", "0", "-c", "64", "-t", "1"])
    out = io.StringIO()
    assert chat_cli.run(args, stdin=io.StringIO("write a function\nhi again\nand again\n"), stdout=out) == 0
    err = capsys.readouterr().err
    assert err.count("filled the context") + err.count("context full") >= 1, err
    lines = out.getvalue().split("\n")
    assert out.getvalue().endswith("\n") and len(lines) - 1 >= 3, out.getvalue()  # a line per reply at least


def test_chat_without_a_template_is_refused_before_the_load(f32_path, tmp_path, monkeypatch):
    from runtime.base.gguf_schema import Key
    from tests.helpers.gguf_edit import rewrite

    bare = tmp_path / "bare.gguf"
    rewrite(f32_path, bare, drop={Key.CHAT_TEMPLATE})

    def never(args):
        raise AssertionError("loaded")

    monkeypatch.setattr(chat_cli, "load_model", never)
    with pytest.raises(StepstreamError, match=r"bare.gguf: this model has no chat template .*`stepstream run`"):
        chat_cli.run(parse(chat_cli, ["-m", str(bare), "-n", "2"]), stdin=io.StringIO("hi\n"), stdout=io.StringIO())
