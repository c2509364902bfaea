"""Fixes from a user review of MTP, sampling, chat and the Python API, on the shipped model:
temperatures too small for float32, a stale MTP generator, sampling keywords of the wrong type,
tool_choice in the API, forced --mtp on a file with fewer heads, and the chat's stdout."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import runtime
from runtime.base.errors import StepstreamError
from runtime.generation.sampling import Sampler, SamplingParams, softmax, temperature

MODEL = Path(runtime.__file__).parent / "data" / "step35-mini-q4_k_m.gguf"
ROOT = Path(runtime.__file__).resolve().parent.parent
TOOLS = [{"type": "function", "function": {"name": "get_weather",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]


@pytest.fixture(scope="module")
def model():
    return runtime.load(MODEL, n_ctx=256, n_threads=1)


# ---- temperatures too small for float32 ----------------------------------------------------------

@pytest.mark.parametrize("t", [1e-30, 1e-38, 1e-39, 1e-45, 1e-300])
def test_a_tiny_temperature_leaves_the_most_likely_tokens_all_the_probability(t):
    """logits / t overflowed float32 (t < ~1e-38, or 0 once t rounds to zero) and the draw
    raised "Probabilities contain NaN": exit 1 in run and chat, a 500 in the server."""
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, 50).astype(np.float32)
    logits[[7, 30]] = logits.max() + 1  # two tied most likely tokens
    logits[3] = -np.inf  # a token an earlier filter ruled out
    p = softmax(temperature(logits, t))
    want = np.zeros(50)
    want[[7, 30]] = 0.5
    np.testing.assert_allclose(p, want, atol=1e-12)
    # temperatures float32 can divide by keep the plain arithmetic (seeded draws unchanged)
    np.testing.assert_array_equal(temperature(logits, 0.7), logits / np.float32(0.7))
    alone = logits.copy()
    alone[30] -= 1
    draws = {Sampler(SamplingParams(temperature=t, top_k=0, top_p=1.0, min_p=0.0, seed=s))(alone) for s in range(5)}
    assert draws == {7}


def test_a_tiny_temperature_generates_the_greedy_text_through_the_cli():
    run = [sys.executable, "-m", "runtime.cli", "run", "-m", str(MODEL), "-p", "def f():", "-n", "8", "-t", "1",
           "-s", "1", "--mtp", "0"]
    greedy = subprocess.run(run + ["--temp", "0"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    tiny = subprocess.run(run + ["--temp", "1e-39"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert greedy.returncode == 0 and tiny.returncode == 0, tiny.stderr
    assert "Traceback" not in tiny.stderr and tiny.stdout == greedy.stdout


# ---- a stale generator with MTP -------------------------------------------------------------------

@pytest.mark.parametrize("mtp", [0, 3])
@pytest.mark.parametrize("taken", [1, 2, 3, 5, 8])
def test_a_stale_generator_stops_at_once_whatever_mtp(model, mtp, taken):
    """With MTP, a generator resumed after another generation yielded up to three more tokens (the
    drafts its last verify pass had accepted) before it raised; without MTP it raised at once."""
    a = model.generate(model.tokenize("def fib(n):"), max_tokens=40, temperature=0, mtp=mtp)
    for _ in range(taken):
        next(a)
    b = model.generate(model.tokenize("class Foo(object):"), max_tokens=4, temperature=0, mtp=mtp)
    next(b)
    with pytest.raises(StepstreamError, match="this generation is stale"):
        next(a)
    b.close()


# ---- the Python API's sampling keywords ---------------------------------------------------------

@pytest.mark.parametrize("kw, message", [
    ({"top_k": None}, "top_k must be an integer, got None"),
    ({"top_k": "40x"}, "top_k must be an integer, got '40x'"),
    ({"top_k": 2.7}, "top_k must be an integer, got 2.7"),
    ({"top_k": True}, "top_k must be an integer, got True"),
    ({"repeat_last_n": 8.0}, "repeat_last_n must be an integer, got 8.0"),
    ({"temperature": "0.5"}, "temperature must be a number, got '0.5'"),
    ({"temp": None}, "temperature must be a number, got None"),
    ({"top_p": None}, "top_p must be a number, got None"),
    ({"min_p": "hot"}, "min_p must be a number, got 'hot'"),
    ({"repeat_penalty": False}, "repeat_penalty must be a number, got False"),
])
def test_sampling_keywords_of_the_wrong_type_are_named(model, kw, message):
    """They raised bare TypeError/ValueError, or were converted silently (2.7 -> 2, True -> 1)."""
    ids = model.tokenize("def f():")
    with pytest.raises(StepstreamError) as e:
        list(model.generate(ids, max_tokens=2, **kw))
    assert str(e.value) == message
    assert list(model.generate(ids, max_tokens=3, temperature=0)) == \
        list(model.generate(ids, max_tokens=3, temperature=0, top_k=np.int64(5), top_p=np.float32(0.5)))


# ---- tool_choice in the API, as the server rules ------------------------------------------------

@pytest.mark.parametrize("tools, choice, message", [
    (TOOLS, {"type": "function", "function": {"name": "nope"}},
     "'tool_choice' names the function 'nope', which is not among 'tools'"),
    (None, "required", "'tool_choice' \"required\" needs 'tools'"),
    ([], "required", "'tool_choice' \"required\" needs 'tools'"),
    (None, {"type": "function", "function": {"name": "get_weather"}},
     "'tool_choice' {\"type\": \"function\", \"function\": {\"name\": \"get_weather\"}} needs 'tools'"),
    ([{"function": {"name": "bad name"}}], "auto",
     "tools[0].function.name must be 1 to 64 letters, digits, _ or -, got \"bad name\""),
    (TOOLS, "sometimes", "'tool_choice' must be auto, none, required or {'type': 'function', 'function': "
                         "{'name': ...}}, got 'sometimes'"),
])
def test_the_api_refuses_the_tool_choices_the_server_refuses(model, tools, choice, message):
    """A call forced to a function never offered was generated, and "required" without tools
    silently ignored, where the server answers 400."""
    msgs = [{"role": "user", "content": "What is the weather in Paris?"}]
    with pytest.raises(StepstreamError) as e:
        model.create_chat_completion(msgs, tools=tools, tool_choice=choice, max_tokens=4, temperature=0)
    assert str(e.value) == message
    forced = model.create_chat_completion(msgs, tools=TOOLS, max_tokens=4, temperature=0,
                                          tool_choice={"type": "function", "function": {"name": "get_weather"}})
    # The miniature never closes the call it is made to start: max_tokens cuts it, and a reply
    # cut inside a call ends with the words before it (none here), no call, finish_reason length
    # (the unfinished markup used to come back as its content: runtime/text/tool_calls.py)
    choice = forced["choices"][0]
    assert choice["message"]["content"] == "" and not choice["message"].get("tool_calls")
    assert choice["finish_reason"] == "length"


# ---- a forced --mtp the file cannot give --------------------------------------------------------

def test_a_forced_draft_length_beyond_the_file_s_heads_is_named(tmp_path):
    """`run --mtp 3` on a file without MTP heads said nothing, as if it drafted."""
    from tests.helpers.gguf_edit import rewrite

    trunk = tmp_path / "trunk.gguf"
    n = runtime.load(MODEL).cfg.n_layers
    rewrite(MODEL, trunk, keep_tensor=lambda name: not any(name.startswith(f"blk.{i}.") for i in range(n, n + 3)))
    base = [sys.executable, "-m", "runtime.cli", "run", "-p", "def f():", "-n", "4", "-t", "1", "--temp", "0"]
    outs = {}
    for path, mtp in ((trunk, "3"), (trunk, "auto"), (MODEL, "3")):
        r = subprocess.run(base + ["-m", str(path), "--mtp", mtp], capture_output=True, text=True, timeout=300, cwd=ROOT)
        assert r.returncode == 0, r.stderr
        outs[path, mtp] = r
    assert f"{trunk}: no MTP heads; --mtp 3 decodes without drafting" in outs[trunk, "3"].stderr
    assert "MTP" not in outs[trunk, "auto"].stderr + outs[MODEL, "3"].stderr  # auto, or heads enough: nothing to say
    assert outs[trunk, "3"].stdout == outs[trunk, "auto"].stdout == outs[MODEL, "3"].stdout


# ---- chat's stdout ------------------------------------------------------------------------------

def test_a_refused_chat_message_writes_nothing_to_stdout():
    """A non-UTF-8 line or a message longer than the context wrote an empty line to stdout, and
    the too-long notice spoke of a system prompt that was never given."""
    chat = [sys.executable, "-m", "runtime.cli", "chat", "-m", str(MODEL), "-t", "1", "-c", "64", "--temp", "0"]
    r = subprocess.run(chat, input=b"caf\xe9\n" + b"word " * 80 + b"\n", capture_output=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert r.stdout == b""
    err = r.stderr.decode()
    assert "not UTF-8" in err or "UTF-8" in err
    assert "tokens, more than the context of 64: not sent" in err and "system prompt" not in err


def test_bench_on_a_file_without_heads_says_so_and_keeps_llama_cpp_s_logs_out(tmp_path):
    """`bench --mtp 3 --llama-cpp` printed 'acceptance per head None (of None drafts)' and a
    llama.cpp log line ('llama_kv_cache_iswa: using full-size SWA cache') in its table."""
    from tests.helpers.gguf_edit import rewrite

    trunk = tmp_path / "trunk.gguf"
    n = runtime.load(MODEL).cfg.n_layers
    rewrite(MODEL, trunk, keep_tensor=lambda name: not any(name.startswith(f"blk.{i}.") for i in range(n, n + 3)))
    r = subprocess.run([sys.executable, "-m", "runtime.cli", "bench", "-m", str(trunk), "-p", "8", "-n", "4", "-r", "1",
                        "-t", "1", "--mtp", "3", "--llama-cpp"], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert "no drafts (the file has no MTP heads)" in r.stdout and "None" not in r.stdout, r.stdout
    assert "llama_" not in r.stdout + r.stderr, r.stdout + r.stderr
