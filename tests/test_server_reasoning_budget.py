"""The reasoning budget through the server's three chat APIs: llama-server's
`thinking_budget_tokens` and OpenAI's `reasoning_effort` on /v1/chat/completions, the Responses
API's `reasoning.effort`, Anthropic's `thinking.budget_tokens` and `output_config.effort`, and
`serve --reasoning-budget` for requests that set none. The model is scripted to reason, then
answer (tests/helpers/scripted_model.py). Each reply is checked against the reference: the
model's greedy continuation of the text that holds the script's first N reasoning tokens and
the closer, parsed as a reply is parsed."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("fastapi")

from runtime.base.errors import StepstreamError  # noqa: E402
from runtime.generation import greedy_tokens  # noqa: E402
from runtime.generation.reasoning_budget import closer_tokens  # noqa: E402
from runtime.loader import load  # noqa: E402
from runtime.text.tool_calls import parse_reply  # noqa: E402
from tests.helpers.scripted_model import write_scripted_model  # noqa: E402

SHIPPED = Path(__file__).resolve().parent.parent / "runtime" / "data" / "step35-mini-q4_k_m.gguf"
REASONING = "First I add two and two, then I check the sum twice."
# The closer's last token (">" and a newline) comes once, at the script's own closing, so that
# the bigram answers after a forced closer too.
SCRIPT = f"<think>{REASONING}\n</think>\nThe answer is 4."
MESSAGES = [{"role": "user", "content": "What is two and two?"}]
N = 60  # max tokens


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    return write_scripted_model(SHIPPED, tmp_path_factory.mktemp("budget") / "m.gguf", SCRIPT)


@pytest.fixture(scope="module")
def local(model_file):
    return load(model_file, n_ctx=1024)


def expected(local, budget: int | None, message: str = "") -> tuple[str, str]:
    """(reasoning, content) of the reply whose reasoning the budget cut: the script up to its
    first `budget` reasoning tokens, the closer, then the model's own continuation."""
    prompt = local.chat_tokens(MESSAGES)
    free = greedy_tokens(local, prompt, N)
    if budget is None:
        head = []
    else:
        text, opened = b"", None
        for i, t in enumerate(free):  # the reasoning starts after the token that completes <think>
            text += local.tokenizer.token_bytes(t)
            if b"<think>" in text:
                opened = i + 1
                break
        head = free[:opened + budget] + closer_tokens(local.tokenize, message)
    tail = []
    for t in greedy_tokens(local, prompt + head, N - len(head)):
        if t in local.tokenizer.eog_ids:
            break
        tail.append(t)
    parsed = parse_reply(local.detokenize(head + tail).decode(), tools=None, calls=False)
    return parsed.reasoning or "", parsed.content or ""


def _app(model_file, **options):
    from fastapi.testclient import TestClient

    from runtime.server.app import create_app
    from runtime.server.engine import Engine

    engine = Engine(load(model_file, n_ctx=1024))
    engine.start()
    return engine, TestClient(create_app(engine, model_name="m", **options))


@pytest.fixture(scope="module")
def http(model_file):
    engine, client = _app(model_file)
    with client:
        yield client
    engine.close()


def _chat(http, **fields) -> tuple[str, str]:
    r = http.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": N, "temperature": 0, **fields})
    assert r.status_code == 200, r.text
    m = r.json()["choices"][0]["message"]
    return m.get("reasoning_content") or "", m["content"] or ""


def test_unbudgeted_reply_is_the_script(http, local):
    assert _chat(http) == (REASONING, "The answer is 4.") == expected(local, None)


@pytest.mark.parametrize("budget", [0, 1, 4])
def test_thinking_budget_tokens_cuts_the_reasoning(http, local, budget):
    want = expected(local, budget)
    assert len(want[0]) < len(REASONING) and want[1] == "The answer is 4."
    assert _chat(http, thinking_budget_tokens=budget) == want
    assert _chat(http, reasoning_budget_tokens=budget) == want
    assert _chat(http, thinking_budget_tokens=-1) == (REASONING, "The answer is 4.")


def test_reasoning_effort_levels(http, local):
    assert _chat(http, reasoning_effort="none") == expected(local, 0)
    assert _chat(http, reasoning_effort="medium") == (REASONING, "The answer is 4.")
    # an explicit budget goes before the effort
    assert _chat(http, reasoning_effort="none", thinking_budget_tokens=4) == expected(local, 4)


@pytest.mark.parametrize("fields, problem", [
    ({"thinking_budget_tokens": -2}, "thinking_budget_tokens"),
    ({"thinking_budget_tokens": "4"}, "thinking_budget_tokens"),
    ({"thinking_budget_tokens": 3, "reasoning_budget_tokens": 4}, "differ"),
    ({"reasoning_effort": "extreme"}, "reasoning_effort"),
    ({"reasoning_effort": "max"}, "reasoning_effort"),  # Anthropic's level, not OpenAI's
    ({"thinking_budget_tokens": 5, "reasoning_effort": "bogus"}, "reasoning_effort"),
])
def test_bad_budgets_are_refused(http, fields, problem):
    r = http.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 4, **fields})
    assert r.status_code == 400 and problem in r.json()["error"]["message"]


def test_the_responses_api_reads_reasoning_effort(http, local):
    r = http.post("/v1/responses", json={"input": MESSAGES[0]["content"], "max_output_tokens": N, "temperature": 0,
                                         "reasoning": {"effort": "none"}})
    assert r.status_code == 200, r.text
    out = r.json()["output"]
    reasoning = [o["content"][0]["text"] for o in out if o["type"] == "reasoning"]
    text = [o["content"][0]["text"] for o in out if o["type"] == "message"]
    want = expected(local, 0)
    assert ("".join(reasoning), "".join(text)) == want


def test_anthropics_thinking_budget_and_effort(http, local):
    def ask(**fields):
        r = http.post("/v1/messages", json={"messages": MESSAGES, "max_tokens": N, "temperature": 0, **fields})
        assert r.status_code == 200, r.text
        blocks = r.json()["content"]
        return ("".join(b["thinking"] for b in blocks if b["type"] == "thinking"),
                "".join(b["text"] for b in blocks if b["type"] == "text"))

    assert ask(thinking={"type": "enabled", "budget_tokens": 4}) == expected(local, 4)
    assert ask(thinking={"type": "enabled", "budget_tokens": 1024}) == (REASONING, "The answer is 4.")
    # the smaller of the two limits; "high" (Anthropic's default) sets none
    assert ask(thinking={"type": "enabled", "budget_tokens": 4}, output_config={"effort": "high"}) == \
        expected(local, 4)
    assert ask(thinking={"type": "adaptive"}, output_config={"effort": "none"}) == expected(local, 0)
    for effort in ("huge", ["low"], {"level": "low"}):  # review 91: a list was a 500 in plain text
        for route, extra in (("/v1/messages", {"max_tokens": 4}), ("/v1/messages/count_tokens", {})):
            r = http.post(route, json={"messages": MESSAGES, "output_config": {"effort": effort}, **extra})
            assert r.status_code == 400 and r.json()["type"] == "error", r.text
            assert "output_config.effort" in r.json()["error"]["message"]


def test_the_servers_budget_and_message_apply_where_a_request_sets_none(model_file, local):
    engine, client = _app(model_file, reasoning_budget=2, reasoning_message=" Done.")
    with client:
        try:
            assert _chat(client) == expected(local, 2, " Done.")
            # Anthropic's requests: thinking absent or disabled takes the server's; enabled its own
            # budget_tokens; adaptive none (the model decides)
            def think(**fields):
                r = client.post("/v1/messages", json={"messages": MESSAGES, "max_tokens": N, "temperature": 0,
                                                      **fields}).json()
                return r["usage"]["output_tokens_details"]["thinking_tokens"]

            cut, whole = think(), think(thinking={"type": "adaptive"})
            assert cut == think(thinking={"type": "disabled"}) < think(thinking={"type": "enabled",
                                                                                 "budget_tokens": 6}) < whole
            # an effort only caps: without thinking, "high" leaves the server's budget (review 93)
            assert think(output_config={"effort": "high"}) == cut
            assert think(thinking={"type": "between_tools"}) == whole
            assert _chat(client, thinking_budget_tokens=-1) == (REASONING, "The answer is 4.")
            # a text completion's reasoning is its own
            ids = local.chat_tokens(MESSAGES)
            r = client.post("/v1/completions", json={"prompt": ids, "max_tokens": 12, "temperature": 0})
            assert r.json()["choices"][0]["text"] == local.detokenize(greedy_tokens(local, ids, 12)).decode()
        finally:
            engine.close()


def test_the_python_api_takes_a_budget_or_an_effort(local):
    def ask(**kw):
        m = local.create_chat_completion(MESSAGES, max_tokens=N, temperature=0, **kw)["choices"][0]["message"]
        return m.get("reasoning_content") or "", m["content"] or ""

    assert ask(reasoning_budget=4) == expected(local, 4)
    assert ask(reasoning_budget=2, reasoning_message=" Done.") == expected(local, 2, " Done.")
    assert ask(reasoning_effort="none") == expected(local, 0)
    assert ask(reasoning_budget=-1) == ask() == (REASONING, "The answer is 4.")
    with pytest.raises(StepstreamError, match="reasoning_budget"):
        ask(reasoning_budget=-5)
    with pytest.raises(StepstreamError, match="effort"):
        ask(reasoning_effort="huge")


def test_chat_cli_takes_a_budget(model_file):
    """`stepstream chat --reasoning-budget N` (llama-cli's flag) bounds each reply's reasoning;
    a value that is no budget is one line and status 2."""
    import os
    import subprocess
    import sys

    root = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": root, "NUMBA_NUM_THREADS": "1"}

    def chat(*flags):
        return subprocess.run([sys.executable, "-m", "runtime.cli", "chat", "-m", str(model_file), "-t", "1", "--temp",
                               "0", "-n", str(N), *flags], input=MESSAGES[0]["content"].encode() + b"\n",
                              capture_output=True, env=env, timeout=300)

    r = chat("--reasoning-budget", "4", "--reasoning-budget-message", " Done.")
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    assert r.stdout.decode().strip() == "<think>First I add Done.\n</think>\nThe answer is 4."
    assert chat().stdout.decode().strip() == SCRIPT
    bad = chat("--reasoning-budget", "-2")
    assert bad.returncode == 2 and "--reasoning-budget" in bad.stderr.decode() and b"Traceback" not in bad.stderr


# ------------------------------------------------------------------ review 91: where a budget must not cut

THINK_TEMPLATE = ("{{- '<|im_start|>assistant\\n' -}}{%- endif -%}",
                  "{{- '<|im_start|>assistant\\n<think>\\n' -}}{%- endif -%}")  # the published template's prompt
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]


def _scripted(root, name: str, text: str, after=None, think_prompt: bool = False) -> Path:
    from runtime.base.gguf_schema import Key
    from tests.helpers.gguf_edit import rewrite

    src = SHIPPED
    if think_prompt:
        template = load(SHIPPED).tokenizer.chat_template
        assert THINK_TEMPLATE[0] in template
        src = root / f"{name}-template.gguf"
        rewrite(SHIPPED, src, change={Key.CHAT_TEMPLATE: template.replace(*THINK_TEMPLATE)})
    return write_scripted_model(src, root / f"{name}.gguf", text, after=after)


def test_a_forced_call_after_a_prompt_that_opened_think_is_not_cut(tmp_path):
    """tool_choice required or named after a prompt that opened <think>: the forced start closes
    the section, so the call is no reasoning (review 91: the budget counted the call's tokens and
    forced its closer into the city's value)."""
    call = "get_weather>\n<parameter=city>\nParis\n</parameter>\n</function>\n</tool_call>"
    path = _scripted(tmp_path, "required", "Need weather.\n</think>\nChecking.", after={"<function=": call},
                     think_prompt=True)
    engine, http = _app(path)
    with http:
        try:
            for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
                # every budget up to past the call's end: some land inside the city's free-text value,
                # where the grammar would let a closer in
                for extra in ({}, {"reasoning_effort": "none"}, *({"thinking_budget_tokens": n} for n in range(16))):
                    r = http.post("/v1/chat/completions", json={
                        "messages": MESSAGES, "tools": TOOLS, "tool_choice": choice, "max_tokens": 60,
                        "temperature": 0, **extra}).json()["choices"][0]
                    assert r["finish_reason"] == "tool_calls", (choice, extra, r)
                    assert r["message"]["tool_calls"][0]["function"]["arguments"] == '{"city": "Paris"}'
            r = http.post("/v1/messages", json={"messages": MESSAGES, "max_tokens": 60, "tool_choice": {"type": "any"},
                                                "thinking": {"type": "enabled", "budget_tokens": 8}, "tools": [
                                                    {"name": "get_weather", "input_schema": TOOLS[0]["function"][
                                                        "parameters"]}]}).json()
            assert r["stop_reason"] == "tool_use" and r["content"][-1]["input"] == {"city": "Paris"}
        finally:
            engine.close()


@pytest.mark.parametrize("script, fields", [
    ("Wrap the reasoning in a <think> tag, then answer.", {}),
    ('{"tag": "<think>", "n": [1, 2], "ok": true}', {"response_format": {"type": "json_object"}}),
    ('<tool_call>\n<function=get_weather>\n<parameter=city>\nthe <think> town\n</parameter>\n</function>\n'
     '</tool_call>', {"tools": TOOLS}),
])
def test_a_think_tag_in_text_json_or_a_call_is_no_reasoning(tmp_path, script, fields):
    """Review 91: a literal <think> anywhere started the budget; with effort none its closer cut
    the answer, broke the JSON and the call. The parser reads them as text: so does the budget."""
    engine, http = _app(_scripted(tmp_path, "literal", script))
    with http:
        try:
            def ask(**extra):
                r = http.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 80, "temperature": 0,
                                                            **fields, **extra})
                assert r.status_code == 200, r.text
                choice = r.json()["choices"][0]
                for call in choice["message"].get("tool_calls") or []:
                    call.pop("id")  # random
                return choice["finish_reason"], choice["message"]

            plain = ask()
            assert plain[0] in ("stop", "tool_calls")
            assert ask(reasoning_effort="none") == ask(thinking_budget_tokens=0) == plain
        finally:
            engine.close()


def test_the_reasoning_field_is_the_servers_choice(model_file):
    """reasoning_content by default (llama.cpp's name), reasoning (vLLM's) or both, whole and
    streamed; a client that reads both shows it twice (Kimi Code's issue 3928), so both is asked for."""
    import json

    for field, names in (("reasoning_content", {"reasoning_content"}), ("reasoning", {"reasoning"}),
                         ("both", {"reasoning_content", "reasoning"})):
        engine, http = _app(model_file, reasoning_field=field)
        with http:
            try:
                m = http.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": N,
                                                             "temperature": 0}).json()["choices"][0]["message"]
                assert {k for k in m if k.startswith("reasoning")} == names
                assert all(m[k] == REASONING for k in names)
                with http.stream("POST", "/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": N,
                                                                        "temperature": 0, "stream": True}) as r:
                    deltas = [json.loads(line[6:])["choices"][0]["delta"] for line in r.iter_lines()
                              if line.startswith("data: {") and json.loads(line[6:])["choices"]]
                for k in names:
                    assert "".join(d.get(k, "") for d in deltas) == REASONING
                assert not any(k in d for d in deltas for k in {"reasoning_content", "reasoning"} - names)
            finally:
                engine.close()


def test_a_message_without_a_budget_is_refused_in_the_python_api(local):
    with pytest.raises(StepstreamError, match="reasoning_message goes with"):
        local.create_chat_completion(MESSAGES, max_tokens=4, reasoning_message=" Done.")
