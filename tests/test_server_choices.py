"""Several choices per request: OpenAI's `n` (completions and chat), the completions' `best_of`,
and llama-server's `n_cmpl` on /completion, against a live server on 127.0.0.1 with the shipped
model through the official `openai` client and raw HTTP. The references are the runtime's plain
decoding with the seeds each choice is given, and, for best_of, log-probabilities from a
teacher-forced float64 log-softmax."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from runtime.generation import complete, generate  # noqa: E402
from runtime.generation.request import Request  # noqa: E402
from runtime.generation.sampling import Sampler, SamplingParams  # noqa: E402
from runtime.loader import load  # noqa: E402
from runtime.server.engine import Busy, Engine  # noqa: E402
from runtime.server.requests import MAX_SEED, choice_params  # noqa: E402
from runtime.text.tool_calls import parse_reply  # noqa: E402
from tests.helpers.live_server import live_server  # noqa: E402

MODEL = Path(__file__).resolve().parent.parent / "runtime" / "data" / "step35-mini-q4_k_m.gguf"
CTX = 2048
PROMPTS = ["def parse(line):\n", "import os\n"]
CHAT = [{"role": "user", "content": "Write a function that adds two numbers."}]


@pytest.fixture(scope="module")
def url():
    with live_server(MODEL, "-t", "1", "--ctx-size", str(CTX), "--alias", "m") as u:
        yield u


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def ref():
    return load(MODEL, n_ctx=CTX, n_threads=1)


def _params(seed, temperature=1.0, **kw) -> SamplingParams:
    """OpenAI's routes' sampling: temperature and top_p alone."""
    return SamplingParams(temperature=temperature, top_k=0, top_p=1.0, min_p=0.0, seed=seed, **kw)


def _local(model, ids, params, max_tokens) -> tuple[str, int]:
    model.reset()
    pieces = list(complete(model, ids, params, max_tokens))
    return "".join(p.text for p in pieces), pieces[-1].n_tokens


def test_llama_servers_n_cmpl_is_read_on_the_openai_routes_too(client, url):
    r = client.completions.create(model="m", prompt=PROMPTS[0], max_tokens=4, temperature=1.0, seed=3,
                                  extra_body={"n_cmpl": 2, "n": 5})  # (n_cmpl first, as llama-server reads it)
    assert [c.index for c in r.choices] == [0, 1]
    chat = client.chat.completions.create(model="m", messages=CHAT, max_tokens=4, extra_body={"n_cmpl": 2})
    assert len(chat.choices) == 2
    resp = httpx.post(url + "/v1/chat/completions", json={"messages": CHAT, "n_cmpl": 200}, timeout=30)
    assert resp.status_code == 400 and resp.json()["error"]["message"] == "'n_cmpl' must be in [1, 128], got 200"


def test_n_completions_are_the_seeds_that_follow_the_one_given(client, ref):
    """Choice j is sampled with seed + j: the choices differ, and each is the one plain decoding
    gives with its seed. Several prompts give n choices each, prompt after prompt; a prompt's
    tokens count once in the usage, every choice's generated tokens count."""
    r = client.completions.create(model="m", prompt=PROMPTS, max_tokens=10, temperature=1.0, seed=41, n=3)
    want, n_generated = [], 0
    for p in PROMPTS:
        ids = ref.tokenize(p, add_bos=True)
        for j in range(3):
            text, n = _local(ref, ids, _params(41 + j), 10)
            want.append(text)
            n_generated += n
    assert [(c.index, c.text) for c in r.choices] == list(enumerate(want))
    assert len(set(want[:3])) > 1, want  # (sampled with one seed, the three would be one text)
    n_prompt = sum(len(ref.tokenize(p, add_bos=True)) for p in PROMPTS)
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (n_prompt, n_generated)
    assert r.usage.total_tokens == n_prompt + n_generated
    # streamed, the same choices: each one's chunks carry its index, and all share the request's id
    chunks = list(client.completions.create(model="m", prompt=PROMPTS, max_tokens=10, temperature=1.0, seed=41, n=3,
                                            stream=True, stream_options={"include_usage": True}))
    texts = [""] * 6
    for c in chunks[:-1]:
        for choice in c.choices:
            texts[choice.index] += choice.text
    assert texts == want
    assert len({c.id for c in chunks}) == 1
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (n_prompt, n_generated)
    finishes = [ch.index for c in chunks for ch in c.choices if ch.finish_reason]
    assert finishes == list(range(6))
    # a choice after a prompt's first finds the prompt in the cache: it evaluates one token
    timings = r.model_extra["timings"]
    assert len(timings) == 6 and [t["prompt_n"] for t in timings[1:3] + timings[4:]] == [1] * 4


def test_echo_streams_each_choices_prompt_first(client):
    chunks = list(client.completions.create(model="m", prompt=PROMPTS[0], max_tokens=3, temperature=0, n=2,
                                            echo=True, stream=True))
    texts = ["", ""]
    for c in chunks:
        for choice in c.choices:
            texts[choice.index] += choice.text
    whole = client.completions.create(model="m", prompt=PROMPTS[0], max_tokens=3, temperature=0, n=2, echo=True)
    assert texts == [c.text for c in whole.choices] and texts[0] == texts[1] and texts[0].startswith(PROMPTS[0])


def _teacher_forced(model, ids: list[int], tokens: list[int]) -> list[float]:
    """Each token's log-probability after the ones before it: float64 log-softmax of the logits."""
    model.reset()
    logits, out = model.eval(ids), []
    for tok in tokens:
        z = logits.astype(np.float64)
        out.append(float(z[tok] - z.max() - np.log(np.exp(z - z.max()).sum())))
        logits = model.eval([tok])
    return out


def test_best_of_sends_the_choices_likeliest_per_token(client, ref):
    """best_of generates that many choices (seeds given one after the other) and sends the n
    whose tokens, the end-of-text token that ended one included, have the highest mean
    log-probability, best first."""
    prompt, seed, k = PROMPTS[0], 7, 4
    ids = ref.tokenize(prompt, add_bos=True)
    eog = ref.tokenizer.eog_ids
    candidates = []
    for j in range(k):
        ref.reset()
        tokens = list(generate(ref, ids, Sampler(_params(seed + j)), 12))
        lps = _teacher_forced(ref, ids, tokens)
        reply = [t for t in tokens if t not in eog]
        candidates.append((float(np.mean(lps)), ref.detokenize(reply).decode("utf-8", "replace"), len(tokens),
                           lps[:len(reply)]))
    ranked = sorted(range(k), key=lambda i: -candidates[i][0])
    assert len({round(c[0], 6) for c in candidates}) == k, candidates  # (no ties: the order is the means')
    r = client.completions.create(model="m", prompt=prompt, max_tokens=12, temperature=1.0, seed=seed, n=2,
                                  best_of=k)
    assert [(c.index, c.text) for c in r.choices] == [(0, candidates[ranked[0]][1]), (1, candidates[ranked[1]][1])]
    assert all(c.logprobs is None for c in r.choices)  # weighed by them, not sent unless asked for
    assert r.usage.completion_tokens == sum(c[2] for c in candidates)  # every generated choice counts
    # the timings are the choices sent's, in their order
    assert [t["predicted_n"] for t in r.model_extra["timings"]] == [candidates[k][2] for k in ranked[:2]]
    asked = client.completions.create(model="m", prompt=prompt, max_tokens=12, temperature=1.0, seed=seed,
                                      best_of=k, logprobs=1)
    assert asked.choices[0].text == candidates[ranked[0]][1]
    assert asked.choices[0].logprobs.token_logprobs == pytest.approx(candidates[ranked[0]][3], abs=1e-4)


def test_chat_n_choices(client, ref):
    r = client.chat.completions.create(model="m", messages=CHAT, max_tokens=12, temperature=1.0, seed=3, n=2)
    ids = ref.chat_tokens(CHAT)
    want = [_local(ref, ids, _params(3 + j), 12) for j in range(2)]
    contents = [parse_reply(text, in_reasoning=False, tools=None, calls=False).content or "" for text, _ in want]
    assert [(c.index, c.message.content) for c in r.choices] == list(enumerate(contents))
    assert contents[0] != contents[1]
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == sum(n for _, n in want)
    chunks = list(client.chat.completions.create(model="m", messages=CHAT, max_tokens=12, temperature=1.0, seed=3,
                                                 n=2, stream=True, stream_options={"include_usage": True}))
    texts, roles = ["", ""], []
    for c in chunks:
        for choice in c.choices:
            texts[choice.index] += choice.delta.content or ""
            if choice.delta.role:
                roles.append(choice.index)
    assert texts == contents and roles == [0, 1]
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens


def test_n_cmpl_on_llama_servers_completion(url, ref):
    """llama-server's /completion: n_cmpl (or n) choices, a list of answers when there are
    several, each with its index and its seed; streamed, the events carry their index."""
    prompt = PROMPTS[1]
    body = {"prompt": prompt, "n_predict": 8, "seed": 20, "n_cmpl": 2}
    got = httpx.post(url + "/completion", json=body, timeout=120).json()
    ids = ref.tokenize(prompt, add_bos=True)
    defaults = dict(temperature=0.8, top_k=40, top_p=0.95, min_p=0.05)  # llama-server's
    want = [_local(ref, ids, SamplingParams(seed=20 + j, **defaults), 8)[0] for j in range(2)]
    assert [(a["index"], a["content"]) for a in got] == list(enumerate(want))
    assert [a["generation_settings"]["seed"] for a in got] == [20, 21]
    alias = httpx.post(url + "/completion", json={**body, "n_cmpl": None, "n": 2}, timeout=120).json()
    assert [a["content"] for a in alias] == want  # OpenAI's name, read when n_cmpl is not given
    one = httpx.post(url + "/completion", json={**body, "n_cmpl": 1}, timeout=120).json()
    assert isinstance(one, dict) and one["content"] == want[0]
    texts, order = ["", ""], []
    with httpx.stream("POST", url + "/completion", json={**body, "stream": True}, timeout=120) as resp:
        for line in resp.iter_lines():
            if line.startswith("data: "):
                event = json.loads(line[6:])
                texts[event["index"]] += event["content"]
                order.append((event["index"], event["stop"]))
    assert texts == want
    # each choice's summary follows its own events, as llama-server sends it when the choice ends
    assert order == sorted(order) and [o for o in order if o[1]] == [(0, True), (1, True)]


@pytest.mark.parametrize("path,extra,message", [
    ("/v1/completions", {"n": 0}, "'n' must be in [1, 128], got 0"),
    ("/v1/completions", {"n": 129}, "'n' must be in [1, 128], got 129"),
    ("/v1/completions", {"best_of": 2, "n": 3},
     "'best_of' (2) must be at least 'n' (3): it is how many choices are generated, of which the n likeliest are sent"),
    ("/v1/completions", {"best_of": 21}, "'best_of' must be in [1, 20], got 21"),
    ("/v1/completions", {"best_of": 2, "stream": True},
     "'best_of' above 'n' cannot be streamed: the likeliest choices are known only once all are generated"),
    ("/v1/chat/completions", {"best_of": 2}, "'best_of' is a field of /v1/completions; here it must be 1, got 2"),
    ("/completion", {"n_cmpl": 0}, "'n_cmpl' must be in [1, 128], got 0"),
])
def test_bad_choice_counts_are_named(url, path, extra, message):
    body = {"messages": CHAT} if "chat" in path else {"prompt": "x"}
    resp = httpx.post(url + path, json={**body, "max_tokens": 2, **extra}, timeout=30)
    assert resp.status_code == 400 and resp.json()["error"]["message"] == message, resp.text
    assert resp.json()["error"]["param"] == next(iter(extra))


def test_a_client_that_leaves_cancels_the_choices_not_yet_run(url, client):
    before = httpx.get(url + "/health").json()["served"]
    stream = client.completions.create(model="m", prompt=PROMPTS[0], max_tokens=2000, temperature=1.0, n=4,
                                       stream=True, extra_body={"ignore_eos": True})
    next(iter(stream))
    stream.close()
    for _ in range(200):
        health = httpx.get(url + "/health").json()
        if not health["busy"] and not health["waiting"]:
            break
        asyncio.run(asyncio.sleep(0.05))
    assert health["served"] - before == 1  # the running choice stopped; the three waiting ones never ran


def test_choice_seeds_wrap_and_no_seed_stays_none():
    p = SamplingParams(seed=MAX_SEED)
    assert choice_params(p, 0) is p and choice_params(p, 2).seed == 1
    assert choice_params(SamplingParams(), 3).seed is None


def test_a_requests_choices_count_once_against_the_queue_and_not_once_one_runs():
    class Model:  # never run: the worker is not started
        pass

    async def main():
        engine = Engine(Model(), queue_size=2)
        reqs = [Request([1, 2], SamplingParams(), 4) for _ in range(5)]
        jobs = engine.submit_group(reqs, False)
        assert engine.waiting == 1 and len({id(j.group) for j in jobs}) == 1
        engine.submit(Request([1], SamplingParams(), 4), False)
        assert engine.waiting == 2
        with pytest.raises(Busy):
            engine.submit_group(reqs[:2], False)
        assert engine._next() is jobs[0]  # the worker takes the first choice: the request runs
        assert engine.waiting == 1  # (the other request; its own later choices are not waiting ones)
        engine.submit(Request([3], SamplingParams(), 4), False)
        assert engine.waiting == 2
        for job in jobs:
            job.cancel.set()
        assert engine.waiting == 2

    asyncio.run(main())


def test_a_choice_is_not_kept_in_the_prompt_cache_for_the_next(ref):
    """The prompt cache is prepared for a request's first choice only: preparing it for the
    later ones kept each earlier choice (prompt and reply) as a conversation, pushing the
    server's other conversations out."""
    class Recorder:
        def __init__(self):
            self.prompts = []

        def prepare(self, model, prompt):
            self.prompts.append(list(prompt))
            return 0

    async def main():
        cache = Recorder()
        engine = Engine(ref, prompt_cache=cache)
        engine.start()
        try:
            ids = ref.tokenize(PROMPTS[0], add_bos=True)
            for reqs in ([Request(ids, _params(j), 3) for j in range(3)], [Request(ids[:-1], _params(9), 3)]):
                for job in engine.submit_group(reqs, False):
                    while not any(kind == "done" for kind, _ in await job.next_events()):
                        pass
            assert cache.prompts == [ids, ids[:-1]]
        finally:
            engine.close()

    asyncio.run(main())


def test_the_self_consistency_example_votes_over_its_choices(url):
    """examples/self_consistency.py: one request of n=7 choices held to a schema of the answers;
    the tally counts every finished choice and the answer is its most frequent (that choice j
    samples with seed + j, which makes the vote reproducible, is checked above)."""
    import re
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    argv = [sys.executable, str(root / "examples" / "self_consistency.py"), "Is 91 a prime number?",
            "--base-url", url + "/v1"]
    first = subprocess.run(argv, capture_output=True, text=True, timeout=300, cwd=root)
    assert first.returncode == 0, first.stderr
    *tally, last = first.stdout.splitlines()
    counts = {k: int(v) for k, v in (line.split(": ") for line in tally)}
    assert set(counts) <= {"yes", "no"} and sorted(counts.values(), reverse=True) == list(counts.values())
    m = re.fullmatch(r"answer: (\w+) \((\d+) of (\d+); \d+ prompt tokens, \d+ generated\)", last)
    assert m and m[1] == tally[0].split(":")[0] and int(m[2]) == max(counts.values())
    assert int(m[3]) == sum(counts.values()) <= 7
