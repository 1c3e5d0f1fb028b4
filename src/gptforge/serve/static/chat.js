// gptforge chat page: plain JavaScript, no build step, no network beyond this server.
// Streams /v1/chat/completions (server-sent events) through fetch + ReadableStream; text is rendered with
// textContent (never innerHTML), so a model or a user can never inject markup.
"use strict";

const $ = (id) => document.getElementById(id);
const els = {
  messages: $("messages"), input: $("input"), send: $("send"), stop: $("stop"), status: $("status"),
  model: $("model"), key: $("api-key"), system: $("system"), temperature: $("temperature"), topP: $("top-p"),
  maxTokens: $("max-tokens"), newChat: $("new-chat"), form: $("composer"),
};
const state = { history: [], controller: null };

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

async function errorText(resp) {
  let message = resp.status + " " + resp.statusText;
  try {
    const body = await resp.json();
    if (body && body.error && body.error.message) message = body.error.message;
  } catch (e) { /* not JSON: keep the status line */ }
  if (resp.status === 401) message = "API key needed: enter the server's key in the settings (" + message + ")";
  return message;
}

async function loadModels() {
  try {
    const resp = await fetch("/v1/models", { headers: headers() });
    if (!resp.ok) { setStatus(await errorText(resp), true); return; }
    const data = await resp.json();
    const current = els.model.value;
    els.model.textContent = "";
    for (const m of data.data) {
      const opt = document.createElement("option");
      opt.value = opt.textContent = m.id;
      els.model.appendChild(opt);
    }
    if (current) els.model.value = current;
    setStatus("ready");
  } catch (e) {
    setStatus("server unreachable: " + e.message, true);
  }
}

function busy(on) {
  els.send.disabled = on;
  els.stop.disabled = !on;
}

// Parse an SSE byte stream; calls onData(payload string) for each `data:` line. Chunk boundaries may fall anywhere,
// even inside a multi-byte UTF-8 character: TextDecoder with stream:true keeps the partial bytes for the next chunk.
async function readSSE(body, onData) {
  const reader = body.getReader();
  const decoder = new TextDecoder("utf-8");
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    buffer += decoder.decode(value || new Uint8Array(), { stream: !done });
    let nl;
    while ((nl = buffer.indexOf("\n")) >= 0) {
      const line = buffer.slice(0, nl).replace(/\r$/, "");
      buffer = buffer.slice(nl + 1);
      if (line.startsWith("data:")) {
        if (onData(line.slice(5).trim()) === false) return;
      }
    }
    if (done) return;
  }
}

async function send() {
  const text = els.input.value;
  if (!text.trim() || state.controller) return;
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
  state.controller = new AbortController();
  busy(true);
  setStatus("generating…");
  try {
    const resp = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), signal: state.controller.signal,
      body: JSON.stringify({
        model: els.model.value || undefined, messages, stream: true, stream_options: { include_usage: true },
        temperature: Number(els.temperature.value), top_p: Number(els.topP.value),
        max_tokens: Number(els.maxTokens.value),
      }),
    });
    if (!resp.ok) throw new Error(await errorText(resp));
    await readSSE(resp.body, (payload) => {
      if (payload === "[DONE]") { sawDone = true; return false; }
      const chunk = JSON.parse(payload);
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
    });
    if (!failed && !sawDone) failed = "the stream ended before it was complete";
  } catch (e) {
    if (e.name === "AbortError") finish = "stopped";
    else failed = e.message;
  } finally {
    state.controller = null;
    busy(false);
    div.classList.remove("streaming");
  }
  if (reply) state.history.push({ role: "assistant", content: reply });
  else state.history.pop();  // nothing came back: let the user send the message again
  if (failed) {
    addMeta(div, "error");
    addMessage("error", failed);
    setStatus(failed, true);
    return;
  }
  let meta = "finish: " + finish;
  if (usage) meta += " · " + usage.prompt_tokens + " prompt + " + usage.completion_tokens + " completion tokens";
  addMeta(div, meta);
  div.dataset.finish = finish;
  setStatus(finish === "stopped" ? "stopped" : "ready");
}

els.form.addEventListener("submit", (e) => { e.preventDefault(); send(); });
els.input.addEventListener("keydown", (e) => {
  // Enter sends, Shift+Enter is a new line, and Enter that confirms an IME composition (Chinese input) does not send.
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing && e.keyCode !== 229) {
    e.preventDefault();
    send();
  }
});
els.stop.addEventListener("click", () => { if (state.controller) state.controller.abort(); });
els.newChat.addEventListener("click", () => {
  if (state.controller) state.controller.abort();
  state.history = [];
  els.messages.textContent = "";
  setStatus("ready");
});
els.key.value = localStorage.getItem("gptforge-api-key") || "";
els.key.addEventListener("change", () => { localStorage.setItem("gptforge-api-key", els.key.value.trim()); loadModels(); });
loadModels();
