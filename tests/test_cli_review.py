"""Small things a user review of the command line found: a size that starts with a minus named
by its own flag, --ram-budget with --no-stream refused, and `plan`'s memory lines that add up.

Reference: the sizes given on the command line and RESERVE_MIN (runtime.base.system)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import runtime
from runtime.base.system import RESERVE_MIN
from runtime.cli import main

MODEL = str(Path(runtime.__file__).parent / "data" / "step35-mini-q4_k_m.gguf")


def _last_error(capsys) -> str:
    return capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.parametrize("cmd, flag", [(["run", "-p", "hi"], "--ram-budget"), (["plan"], "--ram")])
def test_a_negative_looking_size_is_judged_by_its_flag(capsys, cmd, flag):
    with pytest.raises(SystemExit) as e:
        main([cmd[0], "-m", MODEL, flag, "-5GiB", *cmd[1:]])
    assert e.value.code == 2
    assert f"error: argument {flag}: cannot read '-5GiB' as a size" in _last_error(capsys)


def test_plain_negative_numbers_still_reach_their_flag(capsys):
    with pytest.raises(SystemExit) as e:
        main(["run", "-m", MODEL, "-p", "hi", "--temp", "-1.5"])
    assert e.value.code == 2 and "argument --temp: must be 0 (greedy) or more, got -1.5" in _last_error(capsys)


def test_ram_budget_with_no_stream_is_refused(capsys, monkeypatch):
    import runtime.loader
    monkeypatch.setattr(runtime.loader, "load", lambda *a, **k: pytest.fail("loaded"))
    assert main(["run", "-m", MODEL, "-p", "hi", "--no-stream", "--ram-budget", "3MiB"]) == 2
    assert _last_error(capsys) == "error: --ram-budget sizes the streamed experts' cache; it cannot go with --no-stream"


def test_plan_names_the_reserve_the_runtime_lives_in(capsys):
    ram = RESERVE_MIN + 20 * 2**20  # (10 MiB held a full context until the MTP heads' KV caches counted)
    assert main(["plan", "-m", MODEL, "--ram", str(ram), "--ram-gbps", "30"]) == 0
    out = capsys.readouterr().out
    assert f"less {RESERVE_MIN // 2**20} MiB kept for the OS and the runtime (10% of it, at least 1 GiB): 20 MiB " \
        "for the model" in out
    from offload.placement import LIBRARY_PAGES, own_bytes
    from runtime.base.config import ModelConfig
    from runtime.base.gguf_file import GGUFModelFile

    own = own_bytes(ModelConfig.from_gguf(GGUFModelFile(MODEL)), 64, tokenizer_built=False) + LIBRARY_PAGES
    assert f"runtime {own / 2**20:.0f} MiB (both inside the reserve)" in out  # 85 MiB: it grows with the widths
    assert main(["plan", "-m", MODEL, "--ram", str(RESERVE_MIN), "--ram-gbps", "30"]) == 2
    err = _last_error(capsys)
    # the reserve holds the runtime's own memory; only the KV cache as it starts (0.5 MiB) is counted beside it
    assert ", 0.5 MiB for the runtime)" in err and err.endswith("kept for the OS and the runtime (10% of it, at least "
                                                                  "1 GiB) leaves 0.0 MiB"), err
    assert "but the machine of --ram 1024 MiB" in err  # named by its flag, not as this host's memory


def test_plan_reads_a_profile_even_when_every_expert_fits(capsys, tmp_path):
    bad = tmp_path / "p.json"
    bad.write_text("not json")
    assert main(["plan", "-m", MODEL, "--profile", str(bad), "--ram-gbps", "30"]) == 2
    assert _last_error(capsys).startswith(f"error: {bad}: not a stepstream expert profile")
    assert main(["plan", "-m", MODEL, "--vram", "1GiB", "--ram-gbps", "30"]) == 2
    assert _last_error(capsys) == "error: --vram 1024 MiB: plan models RAM and disk only for now; leave --vram at 0"


def test_a_system_prompt_the_context_cannot_hold_is_refused_once(capsys, monkeypatch):
    import io
    import sys

    system = "You are a helpful assistant. " * 10
    n = len(runtime.load(MODEL).chat_tokens([{"role": "system", "content": system}]))
    monkeypatch.setattr(sys, "stdin", io.StringIO("hi\nhello\n"))
    assert main(["chat", "-m", MODEL, "-t", "1", "-c", str(n), "-sys", system]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == (f"error: -sys/--system-prompt: with the chat template it takes {n} tokens, "
                                            f"which leaves no room for a message in a context of {n} (-c/--ctx-size): "
                                            "shorten it or raise -c")
    assert "not sent" not in err


@pytest.mark.parametrize("cmd, flag", [(["run", "-p", "hi"], "--ram-budget"), (["plan"], "--ram")])
def test_a_memory_size_without_a_unit_is_not_taken_as_bytes(capsys, cmd, flag):
    """`--ram 64` was planned as a 64-byte machine ("the available memory 0.0 MiB")."""
    with pytest.raises(SystemExit) as e:
        main([cmd[0], "-m", MODEL, flag, "64", *cmd[1:]])
    assert e.value.code == 2
    assert f"argument {flag}: 64 would be 64 bytes; give a unit, e.g. 64GiB or 64GB" in _last_error(capsys)


def test_plan_refuses_no_memory_and_absurd_rates_and_reads_petabytes(capsys):
    assert main(["plan", "-m", MODEL, "--ram", "0", "--ram-gbps", "30"]) == 2
    assert "--ram 0: give the machine's memory" in _last_error(capsys)
    for flag in ("--ram-gbps", "--disk-gbps"):  # 1e308 GB/s made a token take 0 s: ZeroDivisionError
        with pytest.raises(SystemExit) as e:
            main(["plan", "-m", MODEL, flag, "1e308"])
        assert e.value.code == 2 and f"argument {flag}: must be a rate in GB/s" in _last_error(capsys)
    assert main(["plan", "-m", MODEL, "--ram", "2PiB", "--ram-gbps", "30", "--json"]) == 0  # "cannot read" before
    assert json.loads(capsys.readouterr().out)["memory"].startswith(f"an idle machine of --ram {2 * 2**50 / 2**30:.1f} GiB")


@pytest.mark.parametrize("flag, value, words", [
    ("--gpu-budget", "abc", "cannot read 'abc' as a size"),
    ("--gpu-budget", "0", "must be a positive size, e.g. 6GiB, got 0"),
    ("--ram-budget", "0", "must be a positive size, e.g. 6GiB, got 0"),
])
def test_budgets_are_judged_by_their_flag(capsys, flag, value, words):
    """They were refused in the options' words (`gpu_budget='0' must be ...`, no flag named)."""
    with pytest.raises(SystemExit) as e:
        main(["run", "-m", MODEL, "-p", "hi", flag, value])
    assert e.value.code == 2 and f"error: argument {flag}: {words}" in _last_error(capsys)
