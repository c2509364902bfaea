"""`stepstream serve` against a live server on 127.0.0.1 with the shipped model, through the
official `openai` client and raw HTTP. Each answer is compared with the same computation done
in this process on the same file (the token loop of runtime.generation, the model's logits)."""

from __future__ import annotations

import json
import threading
import os
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

from runtime.generation import SamplingParams, complete  # noqa: E402
from runtime.loader import load  # noqa: E402
from tests.helpers.live_server import live_server, start_server, stop_server  # noqa: E402

MODEL = Path(__file__).resolve().parent.parent / "runtime" / "data" / "step35-mini-q4_k_m.gguf"
NAME = "mini"
KEY = "sk-test-key"
CTX = 1024


@pytest.fixture(scope="module")
def url():
    with live_server(MODEL, "--alias", NAME, "--api-key", KEY, "--ctx-size", str(CTX), "--queue-size", "4",
                     "--max-body", "200000") as u:
        yield u


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def ref():
    return load(MODEL, n_ctx=CTX)


def openai_params(temperature=1.0, top_p=1.0, seed=None) -> SamplingParams:
    """OpenAI's sampling: temperature and top_p only."""
    return SamplingParams(temperature=temperature, top_k=0, top_p=top_p, min_p=0.0, seed=seed)


def local_text(model, ids, params, max_tokens, stop=()):
    model.reset()
    pieces = list(complete(model, ids, params, max_tokens, stop))
    return "".join(p.text for p in pieces), pieces[-1].finish_reason, pieces[-1].n_tokens


CONVERSATION = [{"role": "system", "content": "You write Python."},
                {"role": "user", "content": "Write a function that parses a config file."}]


def test_models_and_health(url, client):
    assert [m.id for m in client.models.list().data] == [NAME]
    r = httpx.get(url + "/health")
    assert r.status_code == 200 and r.json()["status"] == "ok"


def test_completion_greedy_matches_the_runtime(client, ref):
    prompt = "def parse_header(line):\n"
    r = client.completions.create(model=NAME, prompt=prompt, max_tokens=40, temperature=0)
    ids = ref.tokenize(prompt, special=True)
    text, finish, n = local_text(ref, ids, openai_params(0.0), 40)
    assert r.choices[0].text == text and r.choices[0].finish_reason == finish
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), n)
    streamed = client.completions.create(model=NAME, prompt=prompt, max_tokens=40, temperature=0, stream=True)
    chunks = list(streamed)
    assert "".join(c.choices[0].text for c in chunks) == text
    assert chunks[-1].choices[0].finish_reason == finish


def test_seeded_sampling_matches_the_runtime_and_repeats(client, ref):
    prompt = "import os\n"
    kw = dict(model=NAME, prompt=prompt, max_tokens=30, temperature=0.9, top_p=0.9, seed=1234)
    a = client.completions.create(**kw).choices[0].text
    b = client.completions.create(**kw).choices[0].text
    text, _, _ = local_text(ref, ref.tokenize(prompt, special=True), openai_params(0.9, 0.9, 1234), 30)
    assert a == b == text
    other = client.completions.create(**{**kw, "seed": 4321}).choices[0].text
    assert other != text


def test_stop_string_is_not_emitted(client, ref):
    prompt = "class Parser:\n"
    full = client.completions.create(model=NAME, prompt=prompt, max_tokens=40, temperature=0).choices[0].text
    stop = full[10:13]
    r = client.completions.create(model=NAME, prompt=prompt, max_tokens=40, temperature=0, stop=[stop])
    assert r.choices[0].text == full[: full.index(stop)] and r.choices[0].finish_reason == "stop"


def test_completion_logprobs_are_the_models(client, ref):
    prompt = "def main():\n"
    r = client.completions.create(model=NAME, prompt=prompt, max_tokens=5, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    ids = ref.tokenize(prompt, special=True)
    ref.reset()
    logits = ref.eval(ids)
    for i in range(5):
        z = logits.astype(np.float64)
        want = z - z.max() - np.log(np.exp(z - z.max()).sum())  # float64 log-softmax
        tok = int(np.argmax(z))
        assert lp.tokens[i] == ref.detokenize([tok]).decode("utf-8", "replace")
        assert lp.token_logprobs[i] == pytest.approx(want[tok], abs=1e-4)
        top = np.argsort(-want)[:3]
        assert sorted(lp.top_logprobs[i].values(), reverse=True) == pytest.approx(list(want[top]), abs=1e-4)
        logits = ref.eval([tok])
    assert lp.text_offset[0] == len(prompt) and "".join(lp.tokens) == r.choices[0].text


def test_chat_greedy_stream_and_whole_match_the_runtime(client, ref):
    r = client.chat.completions.create(model=NAME, messages=CONVERSATION, max_tokens=30, temperature=0)
    text, finish, n = local_text(ref, ref.chat_tokens(CONVERSATION), openai_params(0.0), 30)
    assert r.choices[0].message.content == text and r.choices[0].finish_reason == finish
    assert r.usage.completion_tokens == n
    chunks = list(client.chat.completions.create(model=NAME, messages=CONVERSATION, max_tokens=30, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert chunks[-1].usage.completion_tokens == n and not chunks[-1].choices


def test_chat_logprobs(client):
    r = client.chat.completions.create(model=NAME, messages=CONVERSATION, max_tokens=4, temperature=0,
                                       logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert len(content) == 4 and all(len(c.top_logprobs) == 2 for c in content)
    assert all(c.logprob == pytest.approx(c.top_logprobs[0].logprob) for c in content)  # greedy: the top one
    assert "".join(c.token for c in content) == r.choices[0].message.content


def _fresh_logprobs(model, ids, n):
    """Greedy log-probabilities of n tokens after ids, from an empty cache, as the server computes them."""
    from runtime.generation.request import log_softmax

    model.reset()
    logits, out = model.eval(ids), []
    for _ in range(n):
        lp = log_softmax(logits)
        tok = int(np.argmax(logits))
        out.append(float(lp[tok]))
        logits = model.eval([tok])
    return out


def test_second_turn_reuses_the_first_and_is_bit_identical_to_a_fresh_evaluation(client, ref):
    long = [{"role": "system", "content": "You are a careful Python reviewer. " * 30}] + CONVERSATION[1:]
    first = client.chat.completions.create(model=NAME, messages=long, max_tokens=60, temperature=0)
    n_first = first.usage.prompt_tokens
    turn2 = long + [{"role": "assistant", "content": first.choices[0].message.content},
                    {"role": "user", "content": "Now add type hints."}]
    second = client.chat.completions.create(model=NAME, messages=turn2, max_tokens=30, temperature=0, logprobs=True)
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached >= n_first + 50  # the whole first prompt and (re-tokenized alike) most of the reply
    assert second.timings["prompt_n"] == second.usage.prompt_tokens - cached
    ids = ref.chat_tokens(turn2)
    fresh, _, _ = local_text(ref, ids, openai_params(0.0), 30)
    assert second.choices[0].message.content == fresh
    # the forward pass does not depend on how positions were cut into chunks: equal bit for bit
    got = [c.logprob for c in second.choices[0].logprobs.content]
    assert got == _fresh_logprobs(ref, ids, len(got))
    # an unrelated prompt shares nothing but the first token
    other = client.completions.create(model=NAME, prompt="zzz", max_tokens=1, temperature=0)
    assert other.usage.prompt_tokens_details.cached_tokens <= 1


def test_a_reply_longer_than_the_rings_rollback_is_dropped_from_the_next_prompt(client, ref):
    """The next turn leaves out part of the last reply (as a client that strips it does): the
    rings cannot trim back that far, so the server returns to its checkpoint at the end of the
    previous prompt, and the answer is still the fresh evaluation's, bit for bit."""
    long = [{"role": "system", "content": "Answer in Python only. " * 30}] + CONVERSATION[1:]
    first = client.chat.completions.create(model=NAME, messages=long, max_tokens=80, temperature=0)
    n_first = first.usage.prompt_tokens
    assert n_first > 144  # past the rings' 128 + 16 slots: they have wrapped
    reply = first.choices[0].message.content
    turn2 = long + [{"role": "assistant", "content": reply[: len(reply) // 3]},
                    {"role": "user", "content": "Shorter, please."}]
    second = client.chat.completions.create(model=NAME, messages=turn2, max_tokens=20, temperature=0, logprobs=True)
    assert second.usage.prompt_tokens_details.cached_tokens == n_first - 1  # the checkpoint: before its last token
    got = [c.logprob for c in second.choices[0].logprobs.content]
    assert got == _fresh_logprobs(ref, ref.chat_tokens(turn2), len(got))


def test_a_retried_request_reuses_its_prompt(client):
    """The same request twice (a client retrying, or "regenerate"): the second evaluates only the
    prompt's last token, even after a reply longer than the rings' rollback, and answers alike."""
    long = [{"role": "system", "content": "Answer in Python only. " * 30}] + CONVERSATION[1:]
    a = client.chat.completions.create(model=NAME, messages=long, max_tokens=60, temperature=0, logprobs=True)
    b = client.chat.completions.create(model=NAME, messages=long, max_tokens=60, temperature=0, logprobs=True)
    assert b.usage.prompt_tokens_details.cached_tokens == b.usage.prompt_tokens - 1
    assert [c.logprob for c in a.choices[0].logprobs.content] == [c.logprob for c in b.choices[0].logprobs.content]


def _post(url, path, body, key=KEY, raw=None):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if raw is not None:
        return httpx.post(url + path, content=raw, headers={**headers, "Content-Type": "application/json"}, timeout=30)
    return httpx.post(url + path, json=body, headers=headers, timeout=30)


CHAT = {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}

BAD = [  # (path, body or raw bytes, status, the field the message must name)
    ("/v1/chat/completions", b"{\"model\": ", 400, "JSON"),
    ("/v1/chat/completions", b"[1, 2]", 400, "object"),
    ("/v1/chat/completions", b"[" * 100000, 400, "nest"),
    ("/v1/chat/completions", {**CHAT, "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/chat/completions", {**CHAT, "max_tokens": "5"}, 400, "max_tokens"),
    ("/v1/chat/completions", {**CHAT, "temperature": "hot"}, 400, "temperature"),
    ("/v1/chat/completions", {**CHAT, "temperature": 7}, 400, "temperature"),
    ("/v1/chat/completions", {**CHAT, "top_p": -0.1}, 400, "top_p"),
    ("/v1/chat/completions", {**CHAT, "top_p": 1.5}, 400, "top_p"),
    ("/v1/chat/completions", {**CHAT, "seed": -2**63 - 1}, 400, "seed"),  # -1 is llama-server's "random"
    ("/v1/chat/completions", {**CHAT, "stream": "yes"}, 400, "stream"),
    ("/v1/chat/completions", {**CHAT, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ("/v1/chat/completions", {**CHAT, "n": 0}, 400, "'n'"),
    ("/v1/chat/completions", {**CHAT, "messages": "hi"}, 400, "messages"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "wizard", "content": "x"}]}, 400, "role"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": 5}]}, 400, "content"),
    ("/v1/chat/completions", {**CHAT, "top_logprobs": 3}, 400, "logprobs"),
    ("/v1/chat/completions", {**CHAT, "tools": [{"type": "function"}]}, 400, "tools[0]"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": "word " * 2000}]}, 400, "context"),
    ("/v1/chat/completions", {**CHAT, "model": "gpt-4o"}, 404, "gpt-4o"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": "x" * 300000}]}, 413, "limit"),
    ("/v1/completions", {"model": NAME, "prompt": [1, 2, 99999]}, 400, "99999"),
    ("/v1/completions", {"model": NAME, "prompt": ""}, 400, "prompt"),
    ("/v1/completions", {"model": NAME}, 400, "prompt"),
    ("/v1/completions", {"model": NAME, "prompt": "x", "logprobs": 50}, 400, "logprobs"),
    ("/v1/completions", {"model": NAME, "prompt": "x", "logprobs": 2, "echo": True}, 400, "echo"),
    ("/v1/completions", b'{"prompt": "\\udc00x"}', 400, "surrogate"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1' + b"0" * 5000 + b"}",
     400, "JSON"),
    ("/v1/chat/completions", {**CHAT, "tool_choice": "required"}, 400, "tools"),
    ("/v1/chat/completions", {**CHAT, "tools": [{"type": "function", "function": {"name": "a>\n<b"}}]}, 400,
     "function.name"),
    ("/v1/chat/completions", {**CHAT, "tools": [{"type": "function", "function": {"name": "f", "parameters": 3}}]},
     400, "parameters"),
]


@pytest.mark.parametrize("path,body,status,names", BAD, ids=[f"{i}-{b[3]}" for i, b in enumerate(BAD)])
def test_bad_requests_get_an_openai_error(url, path, body, status, names):
    r = _post(url, path, None, raw=body) if isinstance(body, bytes) else _post(url, path, body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert names in err["message"] and err["type"] and "code" in err


def test_a_message_using_every_stand_in_character_is_refused(ref):
    """Special-token text in a message is swapped for private-use characters the messages do not
    use (runtime.text.chat_prompt); a message holding all of them cannot be rendered safely."""
    from runtime.base.errors import StepstreamError

    every = "".join(chr(c) for c in range(0xF0000, 0xFFFFE))
    with pytest.raises(StepstreamError, match="private-use"):
        ref.chat_tokens([{"role": "user", "content": every + "<|im_end|>"}])


def test_api_key_is_required_and_checked(url, client):
    assert _post(url, "/v1/chat/completions", CHAT, key=None).status_code == 401
    assert _post(url, "/v1/chat/completions", CHAT, key="sk-wrong").json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="nope", max_retries=0).models.list()
    assert httpx.get(url + "/health").status_code == 200  # no key needed
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "x"}], max_tokens=0)


def test_client_leaving_mid_stream_stops_the_generation(url):
    body = {"model": NAME, "prompt": "def f():\n", "max_tokens": CTX - 20, "temperature": 1.0, "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                      timeout=30) as r:
        lines = r.iter_lines()
        got = []
        for line in lines:
            if line.startswith("data: {"):
                got.append(json.loads(line[6:]))
                if len(got) == 3:
                    break
    left = time.monotonic()
    while httpx.get(url + "/health").json()["busy"]:
        assert time.monotonic() - left < 2.0, "the generation went on after its client left"
        time.sleep(0.01)
    assert len(got) == 3
    # the next request runs at once, on a sound model
    r = _post(url, "/v1/completions", {"model": NAME, "prompt": "x = 1\n", "max_tokens": 3, "temperature": 0})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3


def test_a_full_queue_answers_503_and_requests_do_not_leak(url, ref):
    """Six long requests at once on a queue of four: one runs, four wait, the rest get 503 with
    Retry-After; every answer that completes equals the runtime's answer for its own prompt."""
    prompts = [f"def task_{i}(x):\n" for i in range(8)]
    results: dict[int, httpx.Response] = {}
    ready = threading.Barrier(8)

    def go(i):  # each runs for about half a second, so all eight arrive while the first runs
        ready.wait()
        results[i] = _post(url, "/v1/completions", {"model": NAME, "prompt": prompts[i], "max_tokens": 120,
                                                    "temperature": 0})

    threads = [threading.Thread(target=go, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    codes = sorted(r.status_code for r in results.values())
    assert len(results) == 8 and set(codes) <= {200, 503} and codes.count(503) >= 3, codes
    for i, r in results.items():
        if r.status_code == 503:
            assert r.headers["retry-after"] and r.json()["error"]["code"] == "server_busy"
        else:
            text, _, _ = local_text(ref, ref.tokenize(prompts[i], special=True), openai_params(0.0), 120)
            assert r.json()["choices"][0]["text"] == text


def test_sigterm_ends_streams_with_an_error_and_the_server_exits(ref):
    """Ctrl-C or SIGTERM while a stream runs and another waits: both clients get an error chunk
    and [DONE], the process exits promptly and prints no traceback."""
    # A context long enough that the first stream cannot end before the signal: at 1,000 tokens
    # a quiet machine finished it in the 0.6 s the test waited (one failure in a full run).
    ctx = 4096
    s = start_server(MODEL, "--ctx-size", str(ctx))
    try:
        # (ignore_eos: a stream that met its end of text early ended before the signal)
        body = {"prompt": "def f():\n", "max_tokens": ctx - 20, "temperature": 1.0, "stream": True, "ignore_eos": True}
        got: dict[int, list[str]] = {0: [], 1: []}

        def read(i):
            with httpx.stream("POST", s.url + "/v1/completions", json=body, timeout=30) as r:
                for line in r.iter_lines():
                    if line:
                        got[i].append(line)

        readers = [threading.Thread(target=read, args=(i,)) for i in (0, 1)]
        readers[0].start()
        deadline = time.monotonic() + 30
        while not got[0] and time.monotonic() < deadline:  # the first is generating
            time.sleep(0.01)
        readers[1].start()
        time.sleep(0.3)  # the second waits behind it
        s.proc.terminate()
        for t in readers:
            t.join(20)
        t0 = time.monotonic()
        assert s.proc.wait(20) == 0 and time.monotonic() - t0 < 10
    finally:
        stop_server(s)
    for lines in got.values():
        assert lines[-1] == "data: [DONE]", lines[-3:]
        assert json.loads(lines[-2][6:])["error"]["code"] == "server_shutting_down"
    assert "Traceback" not in s.log, s.log


def test_sigint_stops_a_server_started_with_sigint_ignored():
    """A script's background job starts with SIGINT ignored, and Python keeps an inherited
    SIG_IGN: `kill -INT` (Ctrl-C's signal) must still stop the server, as the README says."""
    import signal

    before = signal.signal(signal.SIGINT, signal.SIG_IGN)  # inherited by the server, as from a shell
    try:
        s = start_server(MODEL, "--ctx-size", "256")
    finally:
        signal.signal(signal.SIGINT, before)
    try:
        s.proc.send_signal(signal.SIGINT)
        assert s.proc.wait(30) == 0
    finally:
        stop_server(s)
    assert "stopping" in s.log and "Traceback" not in s.log, s.log


def test_clients_that_gave_up_do_not_hold_queue_places(url):
    """Four requests time out while a long one runs: the queue of four takes new ones at once."""
    # (ignore_eos: a reply that ended early at its end of text was answered within the timeout)
    long = threading.Thread(target=_post, args=(url, "/v1/completions", {
        "model": NAME, "prompt": "x", "max_tokens": 600, "temperature": 1.0, "ignore_eos": True}))
    long.start()
    time.sleep(0.2)
    for i in range(4):
        with pytest.raises(httpx.TimeoutException):
            httpx.post(url + "/v1/completions", json={"model": NAME, "prompt": f"y{i}", "max_tokens": 600,
                                                      "ignore_eos": True},
                       headers={"Authorization": f"Bearer {KEY}"}, timeout=0.3)
    time.sleep(0.5)  # the server polls its waiting clients every 0.25 s
    assert httpx.get(url + "/health").json()["waiting"] == 0
    r = _post(url, "/v1/completions", {"model": NAME, "prompt": "z", "max_tokens": 2, "temperature": 0})
    long.join(60)
    assert r.status_code == 200


def test_the_last_events_of_a_job_do_not_wait_out_the_coalescing_gap(monkeypatch):
    """Tokens are sent at most once per GAP_S; the end of a job cuts the wait short, so the
    client hears the last tokens when they are made, not up to GAP_S later."""
    import asyncio

    from runtime.server import engine

    monkeypatch.setattr(engine, "GAP_S", 30.0)  # far longer than the test may take

    async def scenario():
        job = engine.Job(request=None, loop=asyncio.get_running_loop())
        job.emit("step", "a")
        first = await job.next_events()  # returns at once: the first batch is not held back
        worker = threading.Thread(target=lambda: (time.sleep(0.05), job.emit("step", "b"), job.emit("done")))
        t0 = time.monotonic()
        worker.start()
        rest = await asyncio.wait_for(job.next_events(), 10.0)
        worker.join()
        return first, rest, time.monotonic() - t0

    first, rest, waited = asyncio.run(scenario())
    assert first == [("step", "a")]
    assert rest == [("step", "b"), ("done", None)]
    assert waited < 10.0


def test_tokens_between_batches_wait_for_the_gap(monkeypatch):
    """The counterpart: tokens that are not the job's end are coalesced for GAP_S."""
    import asyncio

    from runtime.server import engine

    monkeypatch.setattr(engine, "GAP_S", 0.3)

    async def scenario():
        job = engine.Job(request=None, loop=asyncio.get_running_loop())
        job.emit("step", "a")
        await job.next_events()
        t0 = time.monotonic()
        threading.Thread(target=lambda: [job.emit("step", s) for s in "bc"]).start()
        rest = await job.next_events()
        return rest, time.monotonic() - t0

    rest, waited = asyncio.run(scenario())
    assert rest == [("step", "b"), ("step", "c")]
    assert waited >= 0.3


def test_while_the_model_loads_requests_get_503_loading_at_once(tmp_path):
    """Review 8: /health hung until the load ended (the port listened, nobody accepted). A first run
    compiles its kernels for tens of seconds (an empty kernel cache here); meanwhile /health and the
    API answer 503 at once, /health with {"status": "loading"}, as llama-server does."""
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "cache")}
    p = subprocess.Popen([sys.executable, "-m", "runtime.cli", "serve", "-m", str(MODEL), "--port", str(port),
                          "--ctx-size", "256"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                h = httpx.get(f"http://127.0.0.1:{port}/health", timeout=5)
                break
            except httpx.TransportError:  # not listening yet
                assert p.poll() is None and time.monotonic() < deadline
                time.sleep(0.05)
        assert h.status_code == 503 and h.json() == {"status": "loading"}, h.text
        assert h.headers["retry-after"] == "1"
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json={"prompt": "x", "max_tokens": 1}, timeout=5)
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_loading", r.text
    finally:
        p.kill()
        p.wait()
