"""What `stepstream serve` saves, costs and withstands, measured over HTTP against a live server.

    with started_server(serve_argv) as url:                  # a `stepstream serve ... --port 0` command line
        reuse = prefix_reuse(url, conversation, follow_up)   # second turn's time to first token vs the first's
        rates = decode_overhead(url, run_argv, prompt, n)    # decode tok/s through HTTP vs `stepstream run`
        load = load_test(url, clients=16, seconds=30)        # completed / refused (503) / errors / hung

This package sits below runtime.server, so nothing here imports it: the server is a child
process, started from a command line the caller builds (runtime.cli knows its own module
path), and spoken to only over HTTP, as an agent framework would. The child is always
stopped on the way out, on errors and Ctrl-C included.

Times are wall-clock seconds seen by the client unless named after the server's `timings`.
"""

from __future__ import annotations

import contextlib
import json
import math
import queue
import re
import statistics
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import httpx

from runtime.base.child import child_env
from runtime.base.errors import StepstreamError

URL_LINE = re.compile(r"at (http://\S+)/v1")
RUN_RATE = re.compile(r"(\d+) generated;.*then ([0-9.]+) tok/s")


# ---- the server as a child process ----------------------------------------------------------------

@contextlib.contextmanager
def started_server(argv: Sequence[str], *, timeout: float = 900.0) -> Iterator[str]:
    """The base URL (http://HOST:PORT) of a server started as `argv`, once /health answers.

    The URL is read from the line the server prints on stderr when it listens, so `--port 0`
    works; its other stderr lines are kept for the error message should it exit first.
    `timeout` covers loading and, on a first run, compiling the kernels."""
    proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, errors="replace", env=child_env(PYTHONUNBUFFERED="1"))
    lines: queue.Queue[str | None] = queue.Queue()
    seen: list[str] = []

    def pump() -> None:  # drains stderr for the whole run, so that a full pipe never blocks the server
        for line in proc.stderr:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, name="server-stderr", daemon=True).start()
    try:
        deadline = time.monotonic() + timeout
        url = None
        while url is None:
            try:
                line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise StepstreamError(f"the server did not start listening within {timeout:.0f} s: "
                                      + _last(seen)) from None
            if line is None:
                raise StepstreamError(f"the server exited with status {proc.wait()} before listening: {_last(seen)}")
            seen.append(line)
            m = URL_LINE.search(line)
            url = m.group(1) if m else None
        while _health(url) != 200:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise StepstreamError(f"the server at {url} never answered /health: {_last(seen)}")
            time.sleep(0.05)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _health(url: str) -> int | None:
    try:
        return httpx.get(url + "/health", timeout=10).status_code
    except httpx.HTTPError:
        return None


def _last(lines: list[str]) -> str:
    text = " | ".join(line.strip() for line in lines[-3:] if line.strip())
    return text or "(it printed nothing)"


# ---- one streamed request -------------------------------------------------------------------------

class HTTPRefusal(StepstreamError):
    """A status other than 200; `retry_after` is the header's value, when sent."""

    def __init__(self, path: str, status: int, body: str, retry_after: str | None):
        super().__init__(f"POST {path}: HTTP {status}: {body[:300]}")
        self.status, self.retry_after = status, retry_after


@dataclass(frozen=True)
class Streamed:
    """One streamed response, as the client saw it."""

    content: str  # `text` of a completion, `content` of a chat reply
    reasoning: str  # chat `reasoning_content` ("" when none)
    first_s: float | None  # from sending to the first chunk that carries generated text
    end_s: float  # from sending to [DONE]
    finish_reason: str | None
    usage: dict  # OpenAI usage, from the final chunk
    timings: dict | None  # the server's timings, when the stream carries them


def stream(client: httpx.Client, path: str, body: dict) -> Streamed:
    """POST `body` to `path` with stream=True and read the SSE events up to [DONE]. A status
    other than 200 raises HTTPRefusal; an error event or a stream cut short, StepstreamError."""
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    content, reasoning = [], []
    first = finish = usage = timings = None
    t0 = time.perf_counter()
    with client.stream("POST", path, json=body) as r:
        if r.status_code != 200:
            raise HTTPRefusal(path, r.status_code, r.read().decode("utf-8", "replace"), r.headers.get("retry-after"))
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                if usage is None:
                    raise StepstreamError(f"POST {path}: the stream ended without usage")
                return Streamed("".join(content), "".join(reasoning), first, time.perf_counter() - t0, finish,
                                usage, timings)
            chunk = json.loads(data)
            if "error" in chunk:
                raise StepstreamError(f"POST {path}: error event: {chunk['error'].get('message')}")
            usage = chunk.get("usage") or usage
            timings = chunk.get("timings") or timings
            for choice in chunk.get("choices", ()):
                delta = choice.get("delta", choice)  # chat deltas; a completion's choice holds `text`
                piece = delta.get("text") or delta.get("content") or ""
                thought = delta.get("reasoning_content") or ""
                if first is None and (piece or thought or delta.get("tool_calls")):
                    first = time.perf_counter() - t0
                content.append(piece)
                reasoning.append(thought)
                finish = choice.get("finish_reason") or finish
    raise StepstreamError(f"POST {path}: the stream ended without [DONE]")


# ---- 1. prompt-prefix reuse -----------------------------------------------------------------------

SYSTEM = "You are a careful reviewer of Python code. Answer briefly."
FOLLOW_UP = "Thanks. Now name the one function above that most needs a test, and say why."
CHUNK_LINES = 6  # lines of code a message shows: small turns, so the total lands near its target


def chat_counter(model_path: str):
    """(count, wipe_token) for the model at `model_path`, without loading its weights:
    count(messages) is the conversation's prompt tokens as the server renders and tokenizes it
    (the same template and tokenizer, read from the GGUF), and wipe_token is an id that is not
    BOS, for wipe_cache."""
    from runtime.base.gguf_file import GGUFModelFile
    from runtime.text.chat_prompt import chat_ids
    from runtime.text.tokenizer import Tokenizer

    tok = Tokenizer.from_gguf(GGUFModelFile(model_path))
    return (lambda messages: len(chat_ids(tok, messages))), (1 if tok.bos_id == 0 else 0)


def served_context(model_path: str, ctx_size: int | None) -> int:
    """The context `stepstream serve -m model_path [--ctx-size ctx_size]` will hold, from the
    GGUF's header alone (the loader's rule: --ctx-size, or the model's context up to 4096)."""
    from runtime.base.config import ModelConfig
    from runtime.base.gguf_file import GGUFModelFile
    from runtime.base.options import RuntimeOptions

    return RuntimeOptions(n_ctx=ctx_size).context(ModelConfig.from_gguf(GGUFModelFile(model_path)).context_length)


def stdlib_conversation(count_tokens, n_tokens: int) -> list[dict]:
    """A fixed conversation of at most `n_tokens` prompt tokens (as `count_tokens(messages)`
    counts them: the chat template's rendering, tokenized), ending with a user message: a
    system line, then turns where the user shows the next lines of a standard-library module
    and the assistant shows the lines after them. The same Python installation gives the same
    conversation; code is what the shipped miniature was trained on."""
    from convert.corpus import stdlib_files  # only this needs the stdlib's sources

    messages = [{"role": "system", "content": SYSTEM}]
    question = {"role": "user", "content": "What does the code above do?"}
    if count_tokens([*messages, question]) > n_tokens:
        raise StepstreamError(f"a conversation of {n_tokens} tokens is too short to hold a single turn")
    for path in stdlib_files():
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError):
            continue
        for at in range(0, len(lines) - 2 * CHUNK_LINES, 2 * CHUNK_LINES):
            shown = "\n".join(lines[at:at + CHUNK_LINES])
            after = "\n".join(lines[at + CHUNK_LINES:at + 2 * CHUNK_LINES])
            turn = [{"role": "user", "content": f"Here is more of {path.name}:\n```python\n{shown}\n```"},
                    {"role": "assistant", "content": f"It goes on:\n```python\n{after}\n```"}]
            if count_tokens([*messages, *turn, question]) > n_tokens:
                return [*messages, question]
            messages += turn
    raise StepstreamError(f"the standard library's sources hold fewer than {n_tokens} tokens of conversation")


@dataclass(frozen=True)
class Turn:
    prompt_tokens: int
    cached_tokens: int  # prompt tokens the server reused from the previous request's cache
    ttft_s: float  # from sending to the first generated text
    first_token_ms: float | None  # the server's own timings.first_token_ms, when the stream carries it
    reply: str
    reasoning: str


@dataclass(frozen=True)
class PrefixReuse:
    first: Turn  # the conversation, from a cache that shares nothing with it
    second: Turn  # the conversation + the first reply + a new user message
    fresh: Turn  # the second turn's messages again, after a request that shares nothing with them

    @property
    def ttft_ratio(self) -> float:
        return self.second.ttft_s / self.first.ttft_s

    @property
    def identical(self) -> bool:
        """Whether the reused second turn said exactly what a fresh evaluation says (greedy)."""
        return (self.second.reply, self.second.reasoning) == (self.fresh.reply, self.fresh.reasoning)

    def as_dict(self) -> dict:
        turns = {k: vars(getattr(self, k)) for k in ("first", "second", "fresh")}
        return {**turns, "ttft_ratio": self.ttft_ratio, "identical": self.identical}


def wipe_cache(client: httpx.Client, token: int) -> None:
    """Leave the server's cache holding a prompt that shares no token with anything else: a
    completion whose prompt is token ids starting with `token` (pick one that is not BOS)."""
    r = client.post("/v1/completions", json={"prompt": [token] * 4, "max_tokens": 1, "temperature": 0})
    if r.status_code != 200:
        raise StepstreamError(f"POST /v1/completions (the cache wipe): HTTP {r.status_code}: {r.text[:300]}")


def chat_turn(client: httpx.Client, messages: list[dict], max_tokens: int) -> Turn:
    s = stream(client, "/v1/chat/completions", {"messages": messages, "max_tokens": max_tokens, "temperature": 0})
    if s.first_s is None:
        raise StepstreamError(f"the reply to a {s.usage['prompt_tokens']}-token conversation had no text "
                              f"(finish_reason {s.finish_reason}); nothing to time")
    cached = (s.usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    return Turn(s.usage["prompt_tokens"], cached, s.first_s, (s.timings or {}).get("first_token_ms"), s.content,
                s.reasoning)


def next_turn(messages: list[dict], reply: Turn, follow_up: str) -> list[dict]:
    """The conversation an agent sends next: `messages`, the reply to them, and a new user message."""
    said = {"role": "assistant", "content": reply.reply}
    if reply.reasoning:
        said["reasoning_content"] = reply.reasoning
    return [*messages, said, {"role": "user", "content": follow_up}]


def prefix_reuse(url: str, messages: list[dict], follow_up: str, *, wipe_token: int, max_tokens: int = 32,
                 headers: dict | None = None, timeout: float = 900.0) -> PrefixReuse:
    """Time to first token of a conversation's first turn and of its second, greedy; then the
    second turn again from a wiped cache, whose reply the reused one must equal."""
    with httpx.Client(base_url=url, headers=headers, timeout=timeout) as client:
        wipe_cache(client, wipe_token)
        first = chat_turn(client, messages, max_tokens)
        second_messages = next_turn(messages, first, follow_up)
        second = chat_turn(client, second_messages, max_tokens)
        wipe_cache(client, wipe_token)
        fresh = chat_turn(client, second_messages, max_tokens)
    return PrefixReuse(first, second, fresh)


# ---- 2. the server's decode overhead --------------------------------------------------------------

@dataclass(frozen=True)
class DecodeRate:
    tok_s: float  # tokens after the first piece of text, over the time after it
    n_tokens: int  # generated in all
    text: str
    server_tok_s: float | None = None  # the server's timings.predicted_per_second, when the stream carries it


def server_decode(client: httpx.Client, prompt: str, n_tokens: int) -> DecodeRate:
    """Greedy decode of `prompt` through /v1/completions, streamed. The first chunk is taken to
    hold one token (a chunk holds more only when a token ends inside a UTF-8 character), as
    `stepstream run` counts the tokens after its first piece."""
    body = {"prompt": prompt, "max_tokens": n_tokens, "temperature": 0}
    s = stream(client, "/v1/completions", body)
    n = s.usage["completion_tokens"]
    if s.first_s is None or n < 2:
        raise StepstreamError(f"the server generated {n} token(s) for the decode prompt; a rate needs 2 or more")
    timings = s.timings
    if timings is None:  # a stream without timings: the same request, whole, reports them
        r = client.post("/v1/completions", json=body)
        if r.status_code != 200:
            raise StepstreamError(f"POST /v1/completions: HTTP {r.status_code}: {r.text[:300]}")
        timings = r.json().get("timings") or {}
    return DecodeRate((n - 1) / (s.end_s - s.first_s), n, s.content, timings.get("predicted_per_second"))


def run_decode(argv: Sequence[str], timeout: float = 900.0) -> DecodeRate:
    """The rate `stepstream run` reports on its stderr ("... N generated; ... then X tok/s"),
    for `argv`, a greedy `stepstream run ... --no-display-prompt` command line."""
    try:
        done = subprocess.run(list(argv), stdin=subprocess.DEVNULL, capture_output=True, text=True, errors="replace",
                              timeout=timeout, env=child_env())
    except subprocess.TimeoutExpired:
        raise StepstreamError(f"`stepstream run` did not finish within {timeout:.0f} s") from None
    m = RUN_RATE.search(done.stderr)
    if done.returncode != 0 or m is None:
        raise StepstreamError(f"`stepstream run` exited with status {done.returncode} without a decode rate: "
                              + _last(done.stderr.splitlines()))
    text = done.stdout[:-1] if done.stdout.endswith("\n") else done.stdout  # run ends its output with a newline
    return DecodeRate(float(m.group(2)), int(m.group(1)), text)


@dataclass(frozen=True)
class DecodeOverhead:
    server: tuple[DecodeRate, ...]
    run: tuple[DecodeRate, ...]

    @property
    def server_tok_s(self) -> float:
        return statistics.median(r.tok_s for r in self.server)

    @property
    def run_tok_s(self) -> float:
        return statistics.median(r.tok_s for r in self.run)

    @property
    def server_timings_tok_s(self) -> float | None:
        rates = [r.server_tok_s for r in self.server if r.server_tok_s is not None]
        return statistics.median(rates) if rates else None

    @property
    def overhead(self) -> float:
        """The share of `stepstream run`'s decode rate lost through the server (negative: faster)."""
        return 1.0 - self.server_tok_s / self.run_tok_s

    @property
    def per_token_ms(self) -> float:
        """What the server adds to each token, in milliseconds, from the medians: a fixed cost
        per token (a chunk to format and send, an event-loop wake-up), so the share it takes
        shrinks as the model's own time per token grows."""
        return 1000.0 / self.server_tok_s - 1000.0 / self.run_tok_s

    @property
    def best_overhead(self) -> float:
        """The overhead from the fastest run of each: other work on the machine only slows runs down."""
        return 1.0 - max(r.tok_s for r in self.server) / max(r.tok_s for r in self.run)

    @property
    def same_text(self) -> bool:
        return len({r.text for r in self.server + self.run}) == 1

    def as_dict(self) -> dict:
        return {"server_tok_s": self.server_tok_s, "run_tok_s": self.run_tok_s,
                "server_timings_tok_s": self.server_timings_tok_s, "overhead": self.overhead,
                "per_token_ms": self.per_token_ms, "best_overhead": self.best_overhead,
                "same_text": self.same_text, "n_tokens": [r.n_tokens for r in self.server + self.run],
                "server_runs_tok_s": [r.tok_s for r in self.server], "run_runs_tok_s": [r.tok_s for r in self.run]}


def decode_overhead(url: str, run_argv: Sequence[str], prompt: str, n_tokens: int, *, repetitions: int = 3,
                    headers: dict | None = None, timeout: float = 900.0) -> DecodeOverhead:
    """Medians of `repetitions` greedy decodes of `prompt` each way, alternating, so that a
    change in the machine's load falls on both. `run_argv` must decode the same prompt, as
    many tokens, greedily. One unmeasured request first loads what the server loads lazily."""
    server, run = [], []
    with httpx.Client(base_url=url, headers=headers, timeout=timeout) as client:
        server_decode(client, prompt, 2)
        for _ in range(repetitions):
            server.append(server_decode(client, prompt, n_tokens))
            run.append(run_decode(run_argv, timeout))
    return DecodeOverhead(tuple(server), tuple(run))


# ---- 3. load ----------------------------------------------------------------------------------

FINISHED = ("stop", "length", "tool_calls")  # the finish_reason of a request that ended as it should
PROMPTS = ("def read_config(path):\n", "import os\n\n\ndef walk(top):\n", "class Stack:\n    def __init__(self):\n",
           "# Sort a list of records by date\n", "for line in open(name):\n")


@dataclass
class LoadReport:
    clients: int
    seconds: float  # the time clients kept starting requests
    sent: int = 0
    completed: int = 0
    refused: int = 0  # 503 with Retry-After
    errors: int = 0  # anything else: another status, an error event, a malformed or cut-short response
    hung: int = 0  # no answer, or no end, within the hang timeout
    latencies_s: list[float] = field(default_factory=list)  # of the completed requests
    error_samples: list[str] = field(default_factory=list)
    health_status: int | None = None
    health: dict | None = None

    def percentile(self, q: float) -> float | None:
        if not self.latencies_s:
            return None
        ordered = sorted(self.latencies_s)
        return ordered[max(1, math.ceil(q / 100 * len(ordered))) - 1]  # the nearest rank

    @property
    def healthy(self) -> bool:
        return self.health_status == 200 and (self.health or {}).get("status") == "ok"

    @property
    def ok(self) -> bool:
        """Nothing failed or hung, something completed, every request completed or was refused,
        and the server says it is healthy afterwards."""
        return (self.errors == 0 and self.hung == 0 and self.completed > 0
                and self.completed + self.refused == self.sent and self.healthy)

    def as_dict(self) -> dict:
        out = {k: v for k, v in vars(self).items() if k != "latencies_s"}
        return {**out, "p50_s": self.percentile(50), "p99_s": self.percentile(99), "ok": self.ok}


def _one_request(client: httpx.Client, client_id: int, k: int) -> tuple[str, str]:
    """One request of the mix ('completed' | 'refused' | 'error', detail): client and round
    pick the endpoint (completion or chat, streamed or whole), prompt, length and sampling."""
    chat, streamed = (client_id + k) % 2 == 1, (client_id + k) // 2 % 2 == 1
    prompt = PROMPTS[(client_id * 3 + k) % len(PROMPTS)]
    body = {"max_tokens": 4 + (client_id * 7 + k * 3) % 13, "temperature": 0.0 if k % 3 else 0.8, "seed": k}
    body.update({"messages": [{"role": "user", "content": prompt}]} if chat else {"prompt": prompt})
    path = "/v1/chat/completions" if chat else "/v1/completions"
    if streamed:
        try:
            s = stream(client, path, body)
        except HTTPRefusal as e:
            return _refusal(e.status, e.retry_after, str(e))
        except StepstreamError as e:
            return "error", str(e)
        if s.finish_reason not in FINISHED:
            return "error", f"POST {path} (streamed): finish_reason {s.finish_reason!r}"
        return "completed", ""
    r = client.post(path, json=body)
    if r.status_code != 200:
        return _refusal(r.status_code, r.headers.get("retry-after"), f"POST {path}: HTTP {r.status_code}: {r.text[:200]}")
    choice = r.json()["choices"][0]
    if choice.get("finish_reason") not in FINISHED or "usage" not in r.json():
        return "error", f"POST {path}: finish_reason {choice.get('finish_reason')!r}"
    return "completed", ""


def _refusal(status: int, retry_after: str | None, detail: str) -> tuple[str, str]:
    if status == 503 and retry_after is not None:
        return "refused", ""
    return "error", detail + (" (no Retry-After)" if status == 503 else "")


def load_test(url: str, *, clients: int = 16, seconds: float = 30.0, hang_s: float = 120.0,
              retry_s: float = 0.25, headers: dict | None = None) -> LoadReport:
    """`clients` threads send short requests back to back for `seconds`, each waiting for its
    answer; a refused client tries again after `retry_s` (less than the Retry-After of 1 s, to
    keep the queue full). A request with no answer or no end within `hang_s` counts as hung.
    Then /health is read."""
    report = LoadReport(clients, seconds)
    lock = threading.Lock()
    closed = False
    stop_at = time.monotonic() + seconds

    def client_loop(client_id: int) -> None:
        with httpx.Client(base_url=url, headers=headers, timeout=hang_s) as client:
            k = 0
            while time.monotonic() < stop_at:
                t0 = time.perf_counter()
                try:
                    outcome, detail = _one_request(client, client_id, k)
                except httpx.TimeoutException:
                    outcome, detail = "hung", ""
                except Exception as e:  # noqa: BLE001 - whatever went wrong, it is one failed request, counted
                    outcome, detail = "error", f"{type(e).__name__}: {e}"
                elapsed = time.perf_counter() - t0
                if outcome == "completed" and elapsed > hang_s:
                    outcome = "hung"
                with lock:
                    if closed:  # counted as hung already: the report has been handed back
                        return
                    report.sent += 1
                    counter = "errors" if outcome == "error" else outcome
                    setattr(report, counter, getattr(report, counter) + 1)
                    if outcome == "completed":
                        report.latencies_s.append(elapsed)
                    if outcome == "error" and len(report.error_samples) < 5:
                        report.error_samples.append(detail)
                if outcome == "refused":
                    time.sleep(retry_s)
                k += 1

    threads = [threading.Thread(target=client_loop, args=(i,), name=f"load-client-{i}", daemon=True)
               for i in range(clients)]
    for t in threads:
        t.start()
    give_up = stop_at + hang_s + 5  # a request started at stop_at has hang_s to end, then the client stops
    for t in threads:
        t.join(max(0.0, give_up - time.monotonic()))
    with lock:
        stuck = sum(t.is_alive() for t in threads)  # each is inside a request that trickles past the timeout
        report.sent += stuck
        report.hung += stuck
        closed = True
    try:
        r = httpx.get(url + "/health", timeout=30)
        report.health_status = r.status_code
        report.health = r.json()
    except (httpx.HTTPError, ValueError) as e:
        report.error_samples.append(f"GET /health: {type(e).__name__}: {e}")
    return report
