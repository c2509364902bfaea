"""The chat page `stepstream serve` answers at GET / (llama-server serves its web UI there):
the page and its script are served, without a key where the API needs one, and `--no-webui`
turns them off. The page's logic (runtime/server/webui/chat.js) runs under node against the
live server: a streamed reply it builds is the one the `openai` client gets whole, a refused
key and a stopped reply are what the page shows, and the text it renders is escaped."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from tests.helpers.live_server import live_server  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "runtime" / "data" / "step35-mini-q4_k_m.gguf"
WEBUI = ROOT / "runtime" / "server" / "webui"
CHAT_JS = WEBUI / "chat.js"
NODE_HARNESS = Path(__file__).resolve().parent / "helpers" / "webui_node.js"
KEY = "secret"
MESSAGES = [{"role": "user", "content": "Write a Python function that reverses a list."}]


@pytest.fixture(scope="module")
def url():
    with live_server(MODEL, "-t", "1", "--ctx-size", "512", "--alias", "m", "--api-key", KEY) as u:
        yield u


def node(task: dict) -> dict:
    exe = shutil.which("node")
    if exe is None:
        pytest.skip("node is not installed: the page's logic is run by node")
    done = subprocess.run([exe, str(NODE_HARNESS), str(CHAT_JS), json.dumps(task)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_the_page_and_its_files_are_served_without_the_key(url):
    page = httpx.get(url + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert httpx.head(url + "/").status_code == 200
    for name, kind in (("chat.js", "text/javascript"), ("page.js", "text/javascript"), ("page.css", "text/css")):
        ref = f'"webui/{name}"'
        assert ref in page.text, name  # relative: the page works behind a proxy's path prefix too
        got = httpx.get(url + "/webui/" + name)
        assert got.status_code == 200 and got.headers["content-type"].startswith(kind)
        assert got.content == (WEBUI / name).read_bytes()
    # no inline script or style, and a policy that runs none: an injected one would not run
    assert "<script>" not in page.text and "<style" not in page.text and " on" not in page.text.split("<body>")[1]
    csp = page.headers["content-security-policy"]
    assert "script-src 'self';" in csp and "unsafe" not in csp and "frame-ancestors 'none'" in csp
    assert httpx.get(url + "/v1/models").status_code == 401  # the API still needs the key
    assert httpx.get(url + "/webui/other.js").status_code == 404


def test_a_page_opened_while_the_model_loads_waits_for_it():
    import socket

    from runtime.server.loading import LoadingResponder

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    responder = LoadingResponder(sock)
    try:
        base = f"http://127.0.0.1:{sock.getsockname()[1]}"
        page = httpx.get(base + "/")
        assert page.status_code == 503 and page.headers["content-type"].startswith("text/html")
        assert '<meta http-equiv="refresh" content="1">' in page.text
        assert httpx.get(base + "/v1/models").json()["error"]["code"] == "model_loading"  # the API: JSON
    finally:
        responder.stop()
        sock.close()


def test_no_webui_turns_the_page_off():
    with live_server(MODEL, "-t", "1", "--ctx-size", "256", "--no-webui") as u:
        assert httpx.get(u + "/").status_code == 404 and httpx.get(u + "/webui/chat.js").status_code == 404
        assert httpx.get(u + "/health").status_code == 200


def test_the_pages_streamed_reply_is_the_whole_reply(url):
    body = {"messages": MESSAGES, "max_tokens": 48, "temperature": 0}
    got = node({"kind": "chat", "url": url, "key": KEY, "body": body})
    client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=120)
    whole = client.chat.completions.create(model="m", **body)
    message = whole.choices[0].message
    assert got["content"] == message.content and got["content"]
    assert got["reasoning"] == (message.model_extra.get("reasoning_content") or "")
    assert got["finish"] == whole.choices[0].finish_reason
    assert got["usage"]["completion_tokens"] == whole.usage.completion_tokens
    assert got["summary"].startswith(f"{whole.usage.completion_tokens} tokens · ") and "tok/s" in got["summary"]


def test_a_refused_key_and_a_refused_request_are_the_servers_message(url):
    got = node({"kind": "chat", "url": url, "key": "wrong", "body": {"messages": MESSAGES}})
    assert got["status"] == 401 and "API key" in got["error"]
    got = node({"kind": "chat", "url": url, "key": KEY, "body": {"messages": MESSAGES, "temperature": 9}})
    assert got["status"] == 400 and got["error"] == "'temperature' must be in [0, 2], got 9"


def test_stop_ends_the_generation_on_the_server(url):
    body = {"messages": MESSAGES, "max_tokens": 400, "temperature": 1.0, "ignore_eos": True}
    served = httpx.get(url + "/health").json()["served"]
    got = node({"kind": "chat", "url": url, "key": KEY, "body": body, "abortAfter": 3})
    assert got["name"] == "AbortError"
    for _ in range(100):  # the server stops within a token of the page's leaving
        health = httpx.get(url + "/health").json()
        if not health["busy"] and health["served"] > served:
            break
        time.sleep(0.05)
    assert not health["busy"]
    # and the next request is answered at once
    assert node({"kind": "chat", "url": url, "key": KEY, "body": {"messages": MESSAGES, "max_tokens": 2}})["usage"]


def test_events_cut_anywhere_are_read_whole():
    stream = ('data: {"a": 1}\r\n\r\n: a comment\n\ndata: {"b":\ndata: 2}\n\n'
              'event: x\ndata: [DONE]\n\n')
    for cuts in ([len(stream)], [1, 5, 9, 17, 30, len(stream)], list(range(1, len(stream) + 1))):
        pieces, start = [], 0
        for end in cuts:
            pieces.append(stream[start:end])
            start = end
        got = node({"kind": "events", "pieces": pieces})
        assert got == {"events": ['{"a": 1}', '{"b":\n2}', "[DONE]"], "rest": ""}, cuts


def test_rendered_text_is_escaped_and_code_is_kept_as_written():
    texts = ['<script>alert("x")</script> & \'q\'',
             "Use `a<b` and **bold**.\n```python\nif a < b:\n    print('<b>')\n```\nafter",
             "streaming\n```js\nlet x = '<i>'",
             "```word``` is no fence\n  ```\n  indented\n  ```",
             "```\ncode\n``` and text after it\nmore"]
    html = node({"kind": "render", "texts": texts})["html"]
    assert html[0] == "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; &#39;q&#39;"
    assert html[1] == ("Use <code>a&lt;b</code> and <strong>bold</strong>."
                       "<pre><code>if a &lt; b:\n    print(&#39;&lt;b&gt;&#39;)</code></pre>after")
    assert html[2] == "streaming<pre><code>let x = &#39;&lt;i&gt;&#39;</code></pre>"  # an open block, as it streams
    assert html[3] == "``<code>word</code>`` is no fence<pre><code>  indented</code></pre>"
    # a line that is no closing fence stays in the block, shown: no character is dropped
    assert html[4] == "<pre><code>code\n``` and text after it\nmore</code></pre>"


def test_the_pages_script_parses_and_uses_what_chat_js_defines():
    page = (WEBUI / "index.html").read_text()
    script = (WEBUI / "page.js").read_text()
    assert node({"kind": "compile", "code": script}) == {"ok": True}
    assert page.index('src="webui/chat.js"') < page.index('src="webui/page.js"')  # (loaded first)
    exported = re.search(r"module.exports = \{(.*?)\}", CHAT_JS.read_text()).group(1)
    for name in ("streamChat", "Reply", "renderText", "keptMessages"):
        assert name in script and name in exported
    ids = set(re.findall(r'id="([\w-]+)"', page))
    looked_up = set(re.findall(r'\$\("([\w-]+)"\)', script)) | set(re.findall(r'"([\w-]+)"', script.split(
        "const FIELDS = [")[1].split("]")[0]))
    assert looked_up and looked_up <= ids  # every element it looks up exists


def test_a_stored_conversation_keeps_only_turns_it_can_send_again():
    raw = [None, 5, {"role": "user", "content": "hi"}, {"role": "assistant", "content": ["x"]},
           {"role": "system", "content": "s"}, {"role": "assistant", "content": "yes", "reasoning": "r"},
           {"role": "assistant", "content": "no", "reasoning": 7}]
    assert node({"kind": "kept", "raw": raw})["messages"] == [
        {"role": "user", "content": "hi", "reasoning": ""}, {"role": "assistant", "content": "yes", "reasoning": "r"},
        {"role": "assistant", "content": "no", "reasoning": ""}]
    assert node({"kind": "kept", "raw": {"messages": 1}})["messages"] == []


def test_a_stream_that_ends_before_done_is_an_error():
    """A connection cut before `[DONE]` (a proxy that ends the response cleanly) was taken for a
    whole reply."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Cut(BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            self.wfile.write(b'data: {"choices": [{"index": 0, "delta": {"content": "half"}}]}\n\n')

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Cut)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        got = node({"kind": "chat", "url": f"http://127.0.0.1:{server.server_address[1]}", "key": "",
                    "body": {"messages": MESSAGES}})
    finally:
        server.shutdown()
        server.server_close()
    assert got == {"error": "the connection closed before the reply ended", "name": "Error", "status": 0,
                   "content": "half"}
