"""What a user review of the README and the commands found in the command line: refusals that
came after loading the model, or named a flag the command does not have.

Reference: the shipped model's expert table (offload.expert_table) for the smallest budget, and
the model's own tokenizer for the token count."""

from __future__ import annotations

from pathlib import Path

import pytest

import runtime
from offload.expert_table import build_expert_table
from offload.provider import slot_bytes_for
from runtime.base.config import ModelConfig
from runtime.base.gguf_file import GGUFModelFile
from runtime.cli import main

MODEL = str(Path(runtime.__file__).parent / "data" / "step35-mini-q4_k_m.gguf")


def _never_loads(monkeypatch, *modules):
    def fail(*a, **k):
        pytest.fail("the model was loaded before the arguments were refused")
    for module, name in modules:
        monkeypatch.setattr(module, name, fail)


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_demo_names_its_own_flag_for_a_share_too_small(monkeypatch, capsys):
    import runtime.loader

    _never_loads(monkeypatch, (runtime.loader, "load"))
    f = GGUFModelFile(MODEL)
    cfg = ModelConfig.from_gguf(f)
    table = build_expert_table(f, cfg)
    least = slot_bytes_for(table) * cfg.n_expert_used / table.total_bytes
    share = least * 0.9
    assert main(["demo", "-n", "2", "--budget-share", f"{share:.4f}"]) == 2
    err = _error(capsys)
    assert err.startswith(f"error: --budget-share {float(f'{share:.4f}'):g} gives an expert cache of "), err
    assert "--ram-budget" not in err
    given = float(err.rsplit("give at least ", 1)[1])
    assert least <= given <= least + 0.001


@pytest.mark.parametrize("text, n", [("", 1), ("def f():\n    return 1\n", None)])
def test_perplexity_refuses_a_short_text_before_loading(tmp_path, monkeypatch, capsys, text, n):
    import runtime.cli.perplexity as ppl

    _never_loads(monkeypatch, (ppl, "load_model"))
    path = tmp_path / "t.txt"
    path.write_text(text)
    if n is None:  # counted by the model's tokenizer, BOS included, as the evaluation counts it
        n = len(runtime.load(MODEL, n_ctx=64).tokenize(text, add_bos=True))
    assert main(["perplexity", "-m", MODEL, "-f", str(path), "-c", "64"]) == 2
    plural = "" if n == 1 else "s"
    assert _error(capsys) == f"error: the text has {n} token{plural}; perplexity with a context of 64 needs at least 128"


@pytest.mark.parametrize("extra, n_ctx", [([], 16 + 4), (["-c", "256"], 256)])
def test_bench_sizes_its_context_to_the_prompt_and_the_generation(capsys, extra, n_ctx):
    """As llama-bench: without -c the KV cache holds -p + -n positions (it held the default 4096)."""
    import json

    assert main(["bench", "-m", MODEL, "-p", "16", "-n", "4", "-r", "1", "--mtp", "0", "--ram-budget", "3MiB",
                 "--json", *extra]) == 0
    assert json.loads(capsys.readouterr().out)["placement"]["n_ctx"] == n_ctx


@pytest.mark.parametrize("sweep", [[], ["--sweep-ram", "50%"]])
def test_bench_beside_llama_cpp_without_it_installed_is_refused_first(tmp_path, monkeypatch, capsys, sweep):
    """Named before any run, ours included (it ran ours, then showed a child's traceback)."""
    import importlib.util

    import runtime.cli.bench as bench

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llama_cpp" else real(name, *a))
    _never_loads(monkeypatch, (bench, "load_model"))
    monkeypatch.chdir(tmp_path)
    assert main(["bench", "-m", MODEL, "-p", "8", "-n", "2", "--llama-cpp", *sweep]) == 2
    assert _error(capsys).startswith("error: --llama-cpp needs llama-cpp-python, which is not installed: pip install")
    assert list(tmp_path.iterdir()) == []


class _Loaded(Exception):
    pass


@pytest.mark.parametrize("cmd", [["demo", "-n", "2"], ["profile", "-m", MODEL, "--random-tokens", "4", "-o", "p.json"]])
def test_the_kv_cache_type_flags_reach_the_model(tmp_path, monkeypatch, cmd):
    """-ctk/-ctv on every command that loads a model (the README's promise); on profile, `-ctk`
    had been read as `-c tk`."""
    import runtime.loader

    seen = {}

    def load(*a, **k):
        seen.update(k)
        raise _Loaded

    monkeypatch.setattr(runtime.loader, "load", load)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(_Loaded):
        main([*cmd, "-ctk", "q8_0", "--cache-type-v", "f32"])
    assert (seen["cache_type_k"], seen["cache_type_v"]) == ("q8_0", "f32")


def test_bench_serve_passes_the_kv_cache_types_to_the_server_and_run():
    import argparse

    import runtime.cli.bench_serve as bs

    p = argparse.ArgumentParser()
    bs.add_arguments(p)
    argv = bs._common(p.parse_args(["-m", MODEL, "-ctk", "q8_0", "-ctv", "q8_0"]))
    assert argv[argv.index("--cache-type-k") + 1] == "q8_0" and argv[argv.index("--cache-type-v") + 1] == "q8_0"
    # both decode one token at a time: the server's default --mtp auto drafted (a review found
    # draft_n in its timings), so the overhead measured MTP as well as HTTP
    assert argv[argv.index("--mtp") + 1] == "0"
    from runtime.cli.serve import add_arguments as serve_args
    from runtime.cli.run import add_arguments as run_args

    for add, cmd in ((serve_args, bs.serve_argv(MODEL, *argv)), (run_args, bs.run_argv(MODEL, "x", 4, *argv))):
        q = argparse.ArgumentParser()
        add(q)
        assert q.parse_args(cmd[cmd.index("runtime.cli") + 2:]).mtp in (0, "0")
