"""`stepstream bench-serve`'s measurements (runtime.bench.serve) against a live `stepstream serve`
on 127.0.0.1 with the shipped model: prefix reuse on a short conversation (its greedy reply
checked against this process's own evaluation of the same prompt ids), a short load test, and
the issue's bounded load test (16 clients for 30 s, slow)."""

from __future__ import annotations

import http.server
import json
import os
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

pytest.importorskip("fastapi")

from runtime.base.errors import StepstreamError  # noqa: E402
from runtime.bench.serve import (FOLLOW_UP, LoadReport, PrefixReuse, Turn, chat_counter, load_test,  # noqa: E402
                                 next_turn, prefix_reuse, started_server, stdlib_conversation)
from runtime.cli import SubcommandParser, bench_serve  # noqa: E402
from runtime.cli.bench_serve import serve_argv  # noqa: E402
from runtime.generation import SamplingParams, complete  # noqa: E402
from runtime.loader import load  # noqa: E402

MODEL = Path(__file__).resolve().parent.parent / "runtime" / "data" / "step35-mini-q4_k_m.gguf"
CTX = 1024
QUEUE = 4


@pytest.fixture(scope="module")
def url():
    with started_server(serve_argv(str(MODEL), "--ctx-size", str(CTX), "--queue-size", str(QUEUE)), timeout=600) as u:
        yield u


def test_prefix_reuse_reuses_the_first_prompt_and_replies_as_a_fresh_evaluation(url):
    count, wipe_token = chat_counter(str(MODEL))
    messages = stdlib_conversation(count, 400)
    assert messages[-1]["role"] == "user" and 250 < count(messages) <= 400

    r = prefix_reuse(url, messages, FOLLOW_UP, wipe_token=wipe_token, max_tokens=16)

    assert r.first.prompt_tokens == count(messages)
    assert r.first.cached_tokens == 0  # the wipe left nothing it shares
    assert r.second.prompt_tokens > r.first.prompt_tokens
    assert r.second.cached_tokens >= r.first.prompt_tokens  # the whole first prompt was reused
    assert r.fresh.prompt_tokens == r.second.prompt_tokens and r.fresh.cached_tokens == 0
    assert r.identical and r.second.reply
    # the reused reply is also this process's greedy continuation of the second turn's prompt ids
    model = load(MODEL, n_ctx=CTX)
    try:
        ids = model.chat_tokens(next_turn(messages, r.first, FOLLOW_UP))
        assert len(ids) == r.second.prompt_tokens
        greedy = SamplingParams(temperature=0.0, top_k=0, top_p=1.0, min_p=0.0)
        text = "".join(p.text for p in complete(model, ids, greedy, 16))
    finally:
        model.close()
    if r.second.reasoning:  # a template that opens the reply in a <think> section: the parser split the text
        assert r.second.reasoning.strip() in text and r.second.reply.strip() in text
    else:
        assert text == r.second.reply


def test_identical_compares_reply_and_reasoning():
    a = Turn(10, 0, 1.0, None, "x = 1", "")
    assert PrefixReuse(a, a, a).identical
    assert not PrefixReuse(a, a, Turn(10, 0, 1.0, None, "x = 2", "")).identical
    assert not PrefixReuse(a, a, Turn(10, 0, 1.0, None, "x = 1", "hm")).identical
    assert PrefixReuse(a, Turn(12, 10, 0.05, None, "", ""), a).ttft_ratio == pytest.approx(0.05)


def test_latency_percentiles_are_nearest_rank():
    for n in (1, 2, 7, 100, 101):
        x = np.random.default_rng(n).random(n).tolist()
        report = LoadReport(1, 1.0, latencies_s=x)
        for q in (1, 50, 99, 100):
            assert report.percentile(q) == np.percentile(x, q, method="inverted_cdf")
    assert LoadReport(1, 1.0).percentile(50) is None


def _check_load(report: LoadReport) -> None:
    assert report.errors == 0, report.error_samples
    assert report.hung == 0
    assert report.completed > 0
    assert report.completed + report.refused == report.sent  # every request completed or got a 503
    assert report.health_status == 200 and report.health["status"] == "ok"
    assert report.health["busy"] is False and report.health["waiting"] == 0
    assert len(report.latencies_s) == report.completed and report.percentile(50) <= report.percentile(99)
    assert report.ok


def test_short_load_completes_or_refuses_every_request(url):
    report = load_test(url, clients=QUEUE + 3, seconds=3, hang_s=60)
    _check_load(report)


@pytest.mark.slow
def test_sixteen_clients_for_thirty_seconds(url):
    served_before = httpx.get(url + "/health").json()["served"]
    report = load_test(url, clients=16, seconds=30, hang_s=120)
    _check_load(report)
    assert report.refused > 0  # 16 clients against one running and QUEUE waiting: the queue filled
    assert report.health["served"] - served_before >= report.completed


def test_a_server_that_exits_before_listening_is_reported_with_its_message(tmp_path):
    bad = tmp_path / "not-a-model.gguf"
    bad.write_bytes(b"not a GGUF file at all")
    t0 = time.monotonic()
    with pytest.raises(StepstreamError, match=r"exited with status 2 before listening: .*not-a-model\.gguf"):
        with started_server(serve_argv(str(bad)), timeout=120):
            pass
    assert time.monotonic() - t0 < 60


def test_a_server_that_never_listens_is_stopped_after_the_timeout():
    argv = [sys.executable, "-c", "import os, sys, time; print(os.getpid(), file=sys.stderr, flush=True); time.sleep(60)"]
    with pytest.raises(StepstreamError, match="did not start listening within 2 s: [0-9]+") as e:
        with started_server(argv, timeout=2):
            pass
    pid = int(str(e.value).rsplit(":", 1)[1])
    with pytest.raises(ProcessLookupError):  # stopped and reaped on the way out, not left sleeping
        os.kill(pid, 0)


@pytest.mark.slow
def test_bench_serve_command_reports_every_part(capsys, monkeypatch):
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")  # the command would set it for its children, and keep it
    parser = SubcommandParser(prog="stepstream bench-serve")
    bench_serve.add_arguments(parser)
    args = parser.parse_args(["-m", str(MODEL), "-c", "1024", "--conversation-tokens", "300", "--reply-tokens", "8",
                              "-n", "24", "-r", "1", "--load-clients", "4", "--load-seconds", "2", "--json"])
    assert bench_serve.run(args) == 0
    report = json.loads(capsys.readouterr().out)
    reuse, overhead, load_ = report["prefix_reuse"], report["overhead"], report["load"]
    assert reuse["identical"] and reuse["second"]["cached_tokens"] >= reuse["first"]["prompt_tokens"]
    assert reuse["ttft_ratio"] == reuse["second"]["ttft_s"] / reuse["first"]["ttft_s"]
    assert overhead["same_text"] and overhead["n_tokens"] == [24, 24]  # the server and `stepstream run` agree
    assert overhead["overhead"] == pytest.approx(1 - overhead["server_tok_s"] / overhead["run_tok_s"])
    assert overhead["per_token_ms"] == pytest.approx(1000 / overhead["server_tok_s"] - 1000 / overhead["run_tok_s"])
    assert report["omp_wait_policy"] == "PASSIVE"
    assert load_["ok"] and load_["errors"] == 0 and load_["completed"] > 0


class ScriptedServer(http.server.BaseHTTPRequestHandler):
    """An OpenAI-shaped server whose answer is fixed by the request's max_tokens (4..16 in the
    load test's mix), so that every outcome the load test tells apart occurs, and the count
    of each can be predicted from the requests the server received."""

    PLAN = {4: "refused", 5: "error:503-without-retry-after", 6: "error:500", 7: "error:event", 8: "error:cut",
            9: "hung", 10: "error:finish"}  # every other max_tokens: completed
    log: list[str] = []

    def log_message(self, *args) -> None:
        pass

    def _send(self, status: int, body: bytes, headers: dict) -> None:
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        self._send(200, json.dumps({"status": "ok", "busy": False, "waiting": 0}).encode(), {})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        plan = self.PLAN.get(body["max_tokens"], "completed")
        self.log.append(plan.split(":")[0])
        chat, streamed = "messages" in body, body.get("stream", False)
        if plan == "hung":
            time.sleep(3)
            return
        if plan == "refused" or plan.endswith("503-without-retry-after"):
            return self._send(503, b'{"error": {"message": "busy"}}', {"Retry-After": "1"} if plan == "refused" else {})
        if plan.endswith("500"):
            return self._send(500, b'{"error": {"message": "boom"}}', {})
        finish = "bogus" if plan.endswith("finish") else "length"
        choice = ({"delta": {"content": "x"}} if streamed else {"message": {"content": "x"}}) if chat else {"text": "x"}
        usage = {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}
        if not streamed:
            whole = json.dumps({"choices": [{**choice, "finish_reason": finish}], "usage": usage})
            whole = {"event": '{"error": {"message": "generation failed"}}', "cut": whole[:20]}.get(plan[6:], whole)
            return self._send(200, whole.encode(), {"Content-Type": "application/json"})
        events = [{"choices": [{**choice, "finish_reason": None}]}, {"choices": [{"delta": {}, "finish_reason": finish}]}]
        if plan.endswith("event"):
            events.append({"error": {"message": "generation failed"}})
        events.append({"choices": [], "usage": usage})
        lines = [f"data: {json.dumps(e)}\n\n" for e in events] + ([] if plan.endswith("cut") else ["data: [DONE]\n\n"])
        self._send(200, "".join(lines).encode(), {"Content-Type": "text/event-stream"})


def test_load_test_tells_apart_completed_refused_errors_and_hung_requests():
    ScriptedServer.log = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), ScriptedServer)
    server.daemon_threads, server.block_on_close = True, False  # hung answers are not waited for
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        report = load_test(f"http://127.0.0.1:{server.server_port}", clients=6, seconds=1.5, hang_s=1, retry_s=0.01)
    finally:
        server.shutdown()
        server.server_close()
    seen = {k: ScriptedServer.log.count(k) for k in ("completed", "refused", "error", "hung")}
    assert seen["hung"] and seen["error"] and seen["refused"] and seen["completed"]
    assert (report.completed, report.refused, report.errors, report.hung) == tuple(seen.values())
    assert report.sent == len(ScriptedServer.log) and len(report.latencies_s) == report.completed
    assert report.healthy and not report.ok
