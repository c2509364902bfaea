// The chat page's logic without the page: the server's event stream read chunk by chunk, one
// reply's parts (reasoning, content, finish, speed), and text made safe to show. index.html
// loads it; node's tests require it (tests/test_webui.py), against a live server.
"use strict";

// Complete events of a server-sent stream: `buffer` is what has arrived so far; returns the
// data of each complete event (blank-line separated, its `data:` lines joined) and the rest.
function takeEvents(buffer) {
  const events = [];
  const text = buffer.replace(/\r\n/g, "\n");
  let start = 0;
  for (;;) {
    const end = text.indexOf("\n\n", start);
    if (end < 0) break;
    const lines = text.slice(start, end).split("\n");
    const data = lines.filter((l) => l.startsWith("data:")).map((l) => l.slice(5).replace(/^ /, ""));
    if (data.length) events.push(data.join("\n"));
    start = end + 2;
  }
  return { events, rest: text.slice(start) };
}

// The error a failed response carries: OpenAI's {"error": {"message"}} or the status line.
async function responseError(resp) {
  let message = `${resp.status} ${resp.statusText}`;
  try {
    const body = await resp.json();
    if (body && body.error && body.error.message) message = body.error.message;
  } catch (e) { /* not JSON: the status line says it */ }
  const err = new Error(message);
  err.status = resp.status;
  return err;
}

// Stream a chat completion: yields each chunk object in order; throws an Error (with `status`)
// when the server refuses the request, the stream reports an error, or it ends before its
// `[DONE]` (a connection cut). `base` is the server's address ("." on the page itself), `body`
// the request without `stream`.
async function* streamChat(base, body, { apiKey = "", signal = undefined, fetchImpl = fetch } = {}) {
  const headers = { "Content-Type": "application/json" };
  if (apiKey) headers.Authorization = `Bearer ${apiKey}`;
  const resp = await fetchImpl(`${base}/v1/chat/completions`, {
    method: "POST", headers, signal,
    body: JSON.stringify({ ...body, stream: true, stream_options: { include_usage: true } }),
  });
  if (!resp.ok) throw await responseError(resp);
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    buffer += decoder.decode(value || new Uint8Array(), { stream: !done });
    const { events, rest } = takeEvents(done ? buffer + "\n\n" : buffer);
    buffer = rest;
    for (const data of events) {
      if (data === "[DONE]") return;
      const chunk = JSON.parse(data);
      if (chunk.error) {
        const err = new Error(chunk.error.message || "the server reported an error");
        err.status = 500;
        throw err;
      }
      yield chunk;
    }
    if (done) {
      const err = new Error("the connection closed before the reply ended");
      err.status = 0;
      throw err;
    }
  }
}

// The messages of a stored conversation that can be sent again: user and assistant turns
// whose content is text (anything else, written by another page of the same address, say, is
// left out rather than breaking every later request).
function keptMessages(raw) {
  if (!Array.isArray(raw)) return [];
  return raw.filter((m) => m && typeof m === "object" && (m.role === "user" || m.role === "assistant")
    && typeof m.content === "string")
    .map((m) => ({ role: m.role, content: m.content, reasoning: typeof m.reasoning === "string" ? m.reasoning : "" }));
}

// One reply as its chunks build it.
class Reply {
  constructor() {
    this.reasoning = "";
    this.content = "";
    this.finish = null;
    this.usage = null;
    this.timings = null;
  }

  add(chunk) {
    for (const choice of chunk.choices || []) {
      const d = choice.delta || {};
      const thought = d.reasoning_content ?? d.reasoning;
      if (thought) this.reasoning += thought;
      if (d.content) this.content += d.content;
      if (choice.finish_reason) this.finish = choice.finish_reason;
    }
    if (chunk.usage) this.usage = chunk.usage;
    if (chunk.timings) this.timings = chunk.timings;
  }

  // A line under the reply: tokens, speed, and why it ended when that was not its own end.
  summary() {
    const parts = [];
    const t = this.timings;
    if (t && t.predicted_n) {
      parts.push(`${t.predicted_n} tokens`);
      if (t.predicted_per_second) parts.push(`${t.predicted_per_second.toFixed(1)} tok/s`);
      if (t.prompt_n && t.prompt_per_second) parts.push(`prompt ${t.prompt_n} tokens at ${t.prompt_per_second.toFixed(0)} tok/s`);
    }
    if (this.finish === "length") parts.push("cut at the token limit");
    return parts.join(" · ");
  }
}

function escapeHtml(text) {
  return text.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;")
    .replace(/"/g, "&quot;").replace(/'/g, "&#39;");
}

function inline(text) {
  return escapeHtml(text).replace(/`([^`\n]+)`/g, "<code>$1</code>").replace(/\*\*([^*\n]+)\*\*/g, "<strong>$1</strong>");
}

// A reply's text as HTML, every character of it shown and escaped: fenced code blocks (a line
// of ``` and an info word opens one, indented or not; a line of ``` alone closes it; one still
// open runs to the end, as it streams) in <pre><code>, `inline code` in <code>, **bold** in
// <strong>. Line breaks are kept by the page's CSS (white-space: pre-wrap).
function renderText(text) {
  const out = [];
  let prose = [], code = null;
  const flushProse = () => { if (prose.length) out.push(inline(prose.join("\n"))); prose = []; };
  const lines = text.split("\n");
  lines.forEach((line, i) => {
    const last = i === lines.length - 1;
    if (code === null && /^\s*```[^`]*$/.test(line)) {
      flushProse();
      code = [];
    } else if (code !== null && /^\s*```\s*$/.test(line)) {
      out.push(`<pre><code>${escapeHtml(code.join("\n"))}</code></pre>`);
      code = null;
    } else if (code !== null) {
      code.push(line);
    } else {
      prose.push(line);
      if (last) flushProse();
    }
  });
  if (code !== null) out.push(`<pre><code>${escapeHtml(code.join("\n"))}</code></pre>`);
  flushProse();
  return out.join("");
}

if (typeof module !== "undefined") module.exports = { takeEvents, streamChat, Reply, renderText, escapeHtml, keptMessages };
