// gptforge chat page: plain JavaScript, no build step, no network beyond this server.
// Streams /v1/chat/completions (server-sent events) through fetch + ReadableStream rather than EventSource, because
// EventSource can neither POST a body nor send the Authorization header. Text is rendered with textContent (never
// innerHTML), so neither a model nor a user can inject markup; CSS white-space: pre-wrap keeps the newlines.
"use strict";

const KEY_STORE = "gptforge-api-key";
const $ = (id) => document.getElementById(id);
const els = {
  messages: $("messages"), input: $("input"), send: $("send"), stop: $("stop"), status: $("status"),
  model: $("model"), key: $("api-key"), system: $("system"), temperature: $("temperature"), topP: $("top-p"),
  maxTokens: $("max-tokens"), newChat: $("new-chat"), form: $("composer"),
};
// `conversation` counts "new chat" clicks: a reply still finishing from a cleared chat must not write into the new one.
const state = { history: [], controller: null, conversation: 0, composing: false, contexts: {} };

function setStatus(text, isError) {
  els.status.textContent = text;
  els.status.classList.toggle("error", !!isError);
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = els.key.value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  const body = document.createElement("span");
  body.className = "text";
  body.textContent = text;
  div.appendChild(body);
  els.messages.appendChild(div);
  els.messages.scrollTop = els.messages.scrollHeight;
  return div;
}

function addMeta(div, text) {
  const meta = document.createElement("span");
  meta.className = "meta";
  meta.textContent = text;
  div.appendChild(meta);
}

// The message of an HTTP error: the OpenAI-style {"error": {"message"}} body when there is one, else the status line.
async function errorText(resp) {
  let message = "HTTP " + resp.status + " " + resp.statusText;
  try {
    const body = await resp.json();
    if (body && body.error && body.error.message) message = body.error.message;
  } catch (e) { /* not JSON: keep the status line */ }
  if (resp.status === 401) {
    message = "API key needed: enter this server's key in the settings (" + message + ")";
    els.key.focus();
  } else if (resp.status === 429 && resp.headers.get("Retry-After")) {
    message += " (retry in " + resp.headers.get("Retry-After") + " s)";
  }
  return message;
}

async function loadModels() {
  try {
    const resp = await fetch("/v1/models", { headers: headers() });
    if (!resp.ok) { setStatus(await errorText(resp), true); return; }
    const data = await resp.json();
    const current = els.model.value;
    els.model.textContent = "";
    for (const m of data.data || []) {
      const opt = document.createElement("option");
      opt.value = opt.textContent = m.id;
      els.model.appendChild(opt);
      if (m.max_model_len) state.contexts[m.id] = m.max_model_len;
    }
    if (current && state.contexts[current] !== undefined) els.model.value = current;
    showContext();
    setStatus("ready");
  } catch (e) {
    setStatus("server unreachable: " + e.message, true);
  }
}

// max_tokens may not exceed the model's context; a blank field lets the server pick what fits.
function showContext() {
  const ctx = state.contexts[els.model.value];
  if (ctx) {
    els.maxTokens.max = String(ctx);
    els.maxTokens.placeholder = "auto (context " + ctx + ")";
  }
}

function busy(on) {
  els.send.disabled = on;
  els.stop.disabled = !on;
}

// Read a server-sent-event byte stream; onData(payload) gets each event's data (its `data:` lines joined by "\n")
// and may return false to stop reading. Chunk boundaries fall anywhere, even inside a line or inside a multi-byte
// UTF-8 character: TextDecoder with stream:true keeps an incomplete character's bytes for the next chunk, and the
// unfinished line stays in `buffer` until its newline arrives.
async function readSSE(body, onData) {
  const reader = body.getReader();
  const decoder = new TextDecoder("utf-8");
  let buffer = "";
  let data = [];
  const dispatch = () => {
    if (!data.length) return true;
    const payload = data.join("\n");
    data = [];
    return onData(payload) !== false;
  };
  const line = (text) => {
    if (text === "") return dispatch();  // a blank line ends an event
    if (text.startsWith("data:")) data.push(text.slice(text.startsWith("data: ") ? 6 : 5));
    return true;  // comments (":" keep-alives) and other fields (event:, id:, retry:) are not used by this API
  };
  for (;;) {
    const { value, done } = await reader.read();
    buffer += done ? decoder.decode() : decoder.decode(value, { stream: true });
    let nl;
    while ((nl = buffer.indexOf("\n")) >= 0) {
      const text = buffer.slice(0, nl).replace(/\r$/, "");
      buffer = buffer.slice(nl + 1);
      if (!line(text)) { reader.cancel().catch(() => {}); return; }
    }
    if (done) {
      if (buffer) line(buffer.replace(/\r$/, ""));
      dispatch();  // a last event without its blank line still counts
      return;
    }
  }
}

// The sampling settings; a blank field is left out so the server's default applies.
function samplingParams() {
  const out = {};
  const num = (el, name) => {
    if (el.value.trim() === "") return;
    const v = Number(el.value);
    if (!Number.isFinite(v)) throw new Error(name + " must be a number, got " + JSON.stringify(el.value));
    out[name] = v;
  };
  num(els.temperature, "temperature");
  num(els.topP, "top_p");
  num(els.maxTokens, "max_tokens");
  return out;
}

async function send() {
  const text = els.input.value;
  if (!text.trim() || state.controller) return;
  const conversation = state.conversation;
  els.input.value = "";
  addMessage("user", text);
  state.history.push({ role: "user", content: text });
  const messages = [];
  if (els.system.value.trim()) messages.push({ role: "system", content: els.system.value });
  messages.push(...state.history);
  const div = addMessage("assistant", "");
  const out = div.querySelector(".text");
  div.classList.add("streaming");
  let reply = "", finish = null, usage = null, failed = null, sawDone = false;
  const started = performance.now();
  const controller = new AbortController();
  state.controller = controller;
  busy(true);
  setStatus("generating…");
  try {
    const body = { messages, stream: true, stream_options: { include_usage: true }, ...samplingParams() };
    if (els.model.value) body.model = els.model.value;
    const resp = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), signal: controller.signal, body: JSON.stringify(body),
    });
    if (!resp.ok) throw new Error(await errorText(resp));
    await readSSE(resp.body, (payload) => {
      if (payload.trim() === "[DONE]") { sawDone = true; return false; }
      let chunk;
      try {
        chunk = JSON.parse(payload);
      } catch (e) {
        failed = "bad event from the server: " + payload.slice(0, 200);
        return false;
      }
      if (chunk.error) { failed = chunk.error.message || "the server reported an error"; return false; }
      if (chunk.usage) usage = chunk.usage;
      for (const c of chunk.choices || []) {
        if (c.delta && c.delta.content) {
          reply += c.delta.content;
          out.textContent = reply;
          els.messages.scrollTop = els.messages.scrollHeight;
        }
        if (c.finish_reason) finish = c.finish_reason;
      }
      return true;
    });
    if (!failed && !sawDone) failed = "the connection closed before the reply was complete";
  } catch (e) {
    if (e.name === "AbortError") finish = "stopped";
    else failed = e.message;
  } finally {
    div.classList.remove("streaming");
    if (state.controller === controller) {
      state.controller = null;
      busy(false);
    }
  }
  if (conversation !== state.conversation) return;  // "new chat" was pressed meanwhile
  // A stopped or failed reply keeps its partial text on screen and in the history, so the next turn sees it.
  if (reply || (!failed && finish !== "stopped")) state.history.push({ role: "assistant", content: reply });
  else state.history.pop();  // nothing came back: the user may send the message again
  if (failed) {
    if (reply) {  // keep what arrived before the failure, marked as cut short
      div.classList.add("failed");
      addMeta(div, "error: the reply is incomplete");
    } else {
      div.remove();
    }
    addMessage("error", failed);
    setStatus(failed, true);
    return;
  }
  const seconds = ((performance.now() - started) / 1000).toFixed(1);
  let meta = "finish: " + (finish || "unknown");
  if (usage) meta += " · " + usage.prompt_tokens + " prompt + " + usage.completion_tokens + " completion tokens";
  addMeta(div, meta + " · " + seconds + " s");
  div.dataset.finish = finish || "unknown";
  if (finish === "stopped") div.classList.add("stopped");
  setStatus(finish === "stopped" ? "stopped" : "ready");
}

function newChat() {
  state.conversation += 1;
  if (state.controller) state.controller.abort();
  state.controller = null;
  busy(false);
  state.history = [];
  els.messages.textContent = "";
  setStatus("ready");
  els.input.focus();
}

els.form.addEventListener("submit", (e) => { e.preventDefault(); send(); });
// Enter sends and Shift+Enter is a new line. The Enter that confirms an IME composition (Chinese, Japanese input)
// must not send: browsers flag it with isComposing, older ones and Safari with keyCode 229, and the composition
// events cover a keydown that arrives just after compositionend.
els.input.addEventListener("compositionstart", () => { state.composing = true; });
els.input.addEventListener("compositionend", () => { setTimeout(() => { state.composing = false; }, 0); });
els.input.addEventListener("keydown", (e) => {
  if (e.key !== "Enter" || e.shiftKey || e.isComposing || e.keyCode === 229 || state.composing) return;
  e.preventDefault();
  send();
});
els.stop.addEventListener("click", () => { if (state.controller) state.controller.abort(); });
els.newChat.addEventListener("click", newChat);
els.model.addEventListener("change", showContext);
els.key.value = localStorage.getItem(KEY_STORE) || "";
els.key.addEventListener("change", () => {
  localStorage.setItem(KEY_STORE, els.key.value.trim());
  loadModels();
});
loadModels();
