// The page: a conversation kept in this browser (localStorage), sent whole with each turn. The
// logic it calls (the stream, a reply's parts, the rendered text) is chat.js's.
"use strict";
const $ = (id) => document.getElementById(id);
const STORE = "stepstream.chat";
const FIELDS = ["system", "temperature", "max-tokens", "budget", "api-key"];
let messages = [];
let running = null;  // the AbortController of the reply being streamed
let conversation = 0;  // bumped by "New chat": a reply of an earlier conversation is dropped

function save() {
  localStorage.setItem(STORE, JSON.stringify({ messages, settings: Object.fromEntries(FIELDS.map((f) => [f, $(f).value])) }));
}

function load() {
  let saved = {};
  try {
    saved = JSON.parse(localStorage.getItem(STORE) || "{}") || {};
  } catch (e) { /* unreadable: a new conversation */ }
  messages = keptMessages(saved.messages);
  const settings = saved.settings && typeof saved.settings === "object" ? saved.settings : {};
  for (const f of FIELDS) if (typeof settings[f] === "string") $(f).value = settings[f];
}

function bubble(role) {
  const div = document.createElement("div");
  div.className = `msg ${role}`;
  div.innerHTML = `<div class="who">${role === "user" ? "You" : "Assistant"}</div>` +
    (role === "assistant" ? `<details class="thinking" hidden><summary>Thinking</summary><div class="text"></div></details>` : "") +
    `<div class="text body"></div><div class="meta"></div>`;
  $("log").appendChild(div);
  return div;
}

function show(div, content, reasoning) {
  div.querySelector(".body").innerHTML = renderText(content);
  const thinking = div.querySelector("details.thinking");
  if (thinking && reasoning) {
    thinking.hidden = false;
    thinking.querySelector(".text").innerHTML = renderText(reasoning);
  }
}

// Follow the text as it comes only while the reader is at the bottom: one who scrolled up to
// read stays where they are.
function atBottom() {
  const log = $("log");
  return log.scrollHeight - log.scrollTop - log.clientHeight < 40;
}

function toBottom() {
  $("log").scrollTop = $("log").scrollHeight;
}

function redraw() {
  $("log").innerHTML = "";
  for (const m of messages) show(bubble(m.role), m.content, m.reasoning || "");
  toBottom();
}

function number(id) {
  const v = $(id).value.trim();
  return v === "" ? null : Number(v);
}

function request() {
  const body = { messages: messages.map((m) => ({ role: m.role, content: m.content })) };
  if ($("system").value.trim()) body.messages.unshift({ role: "system", content: $("system").value });
  if (number("temperature") !== null) body.temperature = number("temperature");
  if (number("max-tokens") !== null) body.max_tokens = number("max-tokens");
  if (number("budget") !== null) body.thinking_budget_tokens = number("budget");
  return body;
}

// The text of a message that was not answered goes back to the input, before what is there.
function giveBack(text) {
  const draft = $("input").value;
  $("input").value = draft ? `${text}\n\n${draft}` : text;
}

async function send(text) {
  const mine = conversation;
  messages.push({ role: "user", content: text });
  save();
  show(bubble("user"), text, "");
  const div = bubble("assistant");
  toBottom();
  const reply = new Reply();
  running = new AbortController();
  $("send").disabled = true;
  $("stop").disabled = false;
  const meta = div.querySelector(".meta");
  try {
    for await (const chunk of streamChat(".", request(), { apiKey: $("api-key").value, signal: running.signal })) {
      const follow = atBottom();
      reply.add(chunk);
      show(div, reply.content, reply.reasoning);
      if (follow) toBottom();
    }
    messages.push({ role: "assistant", content: reply.content, reasoning: reply.reasoning });
    meta.textContent = reply.summary();
  } catch (e) {
    if (mine !== conversation) return;  // "New chat" while it streamed: this reply is not the new one's
    const stopped = e.name === "AbortError";
    if (reply.content || reply.reasoning) {  // what came so far is the reply
      messages.push({ role: "assistant", content: reply.content, reasoning: reply.reasoning });
      meta.textContent = stopped ? "stopped" : `cut: ${e.message}`;
      if (!stopped) meta.className = "meta error";
    } else {  // nothing came: the message goes back to the input, to send again
      messages.pop();
      div.previousElementSibling.remove();
      div.remove();
      giveBack(text);
      if (!stopped) {
        const note = bubble("assistant");
        note.querySelector(".who").textContent = "Not sent";
        const line = note.querySelector(".meta");
        line.className = "meta error";
        line.textContent = e.status === 401 ? "This server needs an API key: enter it under Settings." : e.message;
      }
    }
  } finally {
    if (mine === conversation) {
      save();
      running = null;
      $("send").disabled = false;
      $("stop").disabled = true;
    }
  }
}

async function showModel() {
  const key = $("api-key").value;
  try {
    const resp = await fetch("v1/models", { headers: key ? { Authorization: `Bearer ${key}` } : {} });
    if (resp.ok) $("model").textContent = (await resp.json()).data.map((m) => m.id).join(", ");
  } catch (e) { /* shown at the first message */ }
}

$("form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const text = $("input").value;
  if (!text.trim() || running) return;
  $("input").value = "";
  for (const note of document.querySelectorAll(".msg .who")) if (note.textContent === "Not sent") note.parentElement.remove();
  send(text);
});
$("input").addEventListener("keydown", (ev) => {
  // Enter sends, except while an input method composes (Safari says so by keyCode 229 alone)
  if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing && ev.keyCode !== 229) {
    ev.preventDefault();
    $("form").requestSubmit();
  }
});
$("stop").addEventListener("click", () => running && running.abort());
$("new").addEventListener("click", () => {
  conversation += 1;
  if (running) running.abort();
  running = null;
  $("send").disabled = false;
  $("stop").disabled = true;
  messages = [];
  save();
  redraw();
});
$("toggle-settings").addEventListener("click", () => $("settings").classList.toggle("open"));
for (const f of FIELDS) $(f).addEventListener("change", () => { save(); if (f === "api-key") showModel(); });
load();
redraw();
showModel();
