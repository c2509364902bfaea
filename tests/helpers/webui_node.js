// Runs the chat page's logic (runtime/server/webui/chat.js) under node for tests/test_webui.py:
// `node webui_node.js CHAT_JS TASK_JSON` prints one JSON line with what the task gave.
"use strict";
const [chatJs, taskJson] = process.argv.slice(2);
const { takeEvents, streamChat, Reply, renderText, keptMessages } = require(chatJs);
const task = JSON.parse(taskJson);

async function main() {
  if (task.kind === "chat") {  // a whole streamed reply, as the page builds it
    const reply = new Reply();
    let chunks = 0;
    const controller = new AbortController();
    try {
      for await (const chunk of streamChat(task.url, task.body, { apiKey: task.key, signal: controller.signal })) {
        reply.add(chunk);
        chunks += 1;
        if (task.abortAfter && chunks >= task.abortAfter) controller.abort();
      }
    } catch (e) {
      return { error: e.message, name: e.name, status: e.status ?? null, content: reply.content };
    }
    return { reasoning: reply.reasoning, content: reply.content, finish: reply.finish, usage: reply.usage,
             summary: reply.summary(), chunks };
  }
  if (task.kind === "events") {  // a stream cut into pieces anywhere
    let buffer = "";
    const events = [];
    for (const piece of task.pieces) {
      const got = takeEvents(buffer + piece);
      events.push(...got.events);
      buffer = got.rest;
    }
    return { events, rest: buffer };
  }
  if (task.kind === "render") return { html: task.texts.map(renderText) };
  if (task.kind === "kept") return { messages: keptMessages(task.raw) };
  if (task.kind === "compile") {  // the page's own script parses (it runs only in a browser)
    new (require("vm").Script)(task.code, { filename: "index.html" });
    return { ok: true };
  }
  throw new Error(`unknown task ${task.kind}`);
}

main().then((out) => console.log(JSON.stringify(out)), (e) => { console.error(e.stack); process.exit(1); });
