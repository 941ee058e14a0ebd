// The chat page: conversations (sidebar: new, open, delete, export), settings, the message list with
// regenerate and edit-and-resend, and the send/stop cycle over chat.js's stream. Markdown through markdown.js
// (never innerHTML). Keys: Enter sends, Shift+Enter adds a new line, Escape stops the answer being streamed.
// Leaves out: several answers per prompt, branching history (an edit drops the messages after it).

import { Attachments, wire } from "./attach.js";
import { ApiError, describe, listModels, streamChat } from "./chat.js";
import { render } from "./markdown.js";
import * as store from "./store.js";

const $ = (id) => document.getElementById(id);
const ui = {
  messages: $("messages"), prompt: $("prompt"), send: $("send"), stop: $("stop"), status: $("status"),
  list: $("conversations"), model: $("model-name"), settings: $("settings"), sidebar: $("sidebar"),
  key: $("api-key"), system: $("system-prompt"), temperature: $("temperature"), topP: $("top-p"),
  maxTokens: $("max-tokens"), seed: $("seed"), composer: $("composer"),
};
const data = store.loadConversations();
const settings = store.loadSettings();
const attachments = new Attachments($("attachments"), say);
let apiKey = store.loadKey();
let model = null;
let running = null;  // {controller, message} while an answer streams

function say(text) {
  ui.status.textContent = text;
}

function current() {
  let conv = data.conversations.find((c) => c.id === data.current);
  if (!conv) {
    conv = store.newConversation();
    data.conversations.unshift(conv);
    data.current = conv.id;
  }
  return conv;
}

function save() {
  try {
    const dropped = store.saveConversations(data);
    if (dropped) say(`browser storage is full: ${dropped} image(s) not kept, oldest conversations first`);
  } catch (err) {
    say("could not save the conversation in this browser: " + err.message);
  }
}

// ------------------------------------------------------------------ drawing

function button(text, onClick, label) {
  const b = document.createElement("button");
  b.type = "button";
  b.textContent = text;
  if (label) b.setAttribute("aria-label", label);
  b.addEventListener("click", onClick);
  return b;
}

function metaLine(meta) {
  if (meta.stopped) return "stopped" + (meta.seconds ? ` after ${meta.seconds.toFixed(1)} s` : "");
  const parts = [];
  if (meta.usage) {
    const u = meta.usage;
    parts.push(`${u.prompt_tokens} prompt + ${u.completion_tokens} completion tokens in ${meta.seconds.toFixed(2)} s`);
    if (meta.tps) parts.push(`${meta.tps.toFixed(1)} tokens/s`);
  }
  if (meta.ttft !== undefined) parts.push(`first token ${meta.ttft.toFixed(2)} s`);
  if (meta.finish) parts.push(`finish: ${meta.finish}`);
  return parts.join(" \u00b7 ");
}

function fillAssistant(node, msg, streaming) {
  const body = document.createElement("div");
  body.className = "body" + (streaming ? " cursor" : "");
  body.append(render(msg.text || ""));
  const parts = [body];
  if (msg.error) {
    const err = document.createElement("div");
    err.className = "error";
    err.setAttribute("role", "alert");
    err.textContent = msg.error;
    parts.push(err);
  }
  if (msg.meta) {
    const meta = document.createElement("div");
    meta.className = "meta";
    meta.textContent = metaLine(msg.meta);
    parts.push(meta);
  }
  node.querySelector(".content").replaceChildren(...parts);
}

function drawMessage(msg, index, last) {
  const node = document.createElement("article");
  node.className = "msg " + msg.role;
  node.dataset.index = index;
  const role = document.createElement("div");
  role.className = "role";
  role.textContent = msg.role === "user" ? "You" : model || "assistant";
  const content = document.createElement("div");
  content.className = "content";
  const actions = document.createElement("div");
  actions.className = "actions";
  node.append(role, content, actions);
  if (msg.role === "user") {
    if (msg.images?.length || msg.imagesDropped) {
      const images = document.createElement("div");
      images.className = "images";
      for (const url of msg.images || []) {
        const img = document.createElement("img");
        img.src = url;
        img.alt = "attached image";
        images.append(img);
      }
      if (msg.imagesDropped) images.append("(images not kept: browser storage was full)");
      content.append(images);
    }
    const text = document.createElement("div");
    text.className = "user-text";
    text.textContent = msg.text;
    content.append(text);
    actions.append(button("Edit", () => startEdit(node, index), "Edit and resend"));
  } else {
    fillAssistant(node, msg, running && running.message === msg);
    if (last) actions.append(button("Regenerate", regenerate));
  }
  return node;
}

function draw() {
  const conv = current();
  const last = conv.messages.length - 1;
  const nodes = conv.messages.map((m, i) => drawMessage(m, i, i === last && !running));
  if (!nodes.length) {
    const hint = document.createElement("p");
    hint.id = "empty-hint";
    hint.textContent = "Attach an image (button, paste or drag and drop) and ask about it.";
    nodes.push(hint);
  }
  ui.messages.replaceChildren(...nodes);
  ui.messages.scrollTop = ui.messages.scrollHeight;
  ui.list.replaceChildren(...data.conversations.map((c) => {
    const li = document.createElement("li");
    if (c.id === data.current) li.className = "current";
    const open = button(c.title, () => { if (!running) { data.current = c.id; save(); draw(); closeSidebar(); } });
    open.className = "open";
    open.title = c.title;
    li.append(open, button("\u00d7", () => remove(c.id), "Delete conversation " + c.title));
    return li;
  }));
  ui.send.hidden = !!running;
  ui.stop.hidden = !running;
}

function startEdit(node, index) {
  if (running) return;
  const msg = current().messages[index];
  const area = document.createElement("textarea");
  area.className = "edit";
  area.value = msg.text;
  area.setAttribute("aria-label", "Edit message");
  const done = () => {
    const conv = current();
    conv.messages = conv.messages.slice(0, index + 1);
    msg.text = area.value;
    answer();
  };
  area.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); done(); }
  });
  node.querySelector(".content .user-text").replaceWith(area);
  node.querySelector(".actions").replaceChildren(button("Save & send", done), button("Cancel", draw));
  area.focus();
}

// ------------------------------------------------------------------ conversations

function remove(id) {
  if (running) return;
  data.conversations = data.conversations.filter((c) => c.id !== id);
  if (data.current === id) data.current = data.conversations[0]?.id ?? null;
  save();
  draw();
}

function exportAll() {
  const blob = new Blob([JSON.stringify(data.conversations, null, 2)], { type: "application/json" });
  const a = document.createElement("a");
  a.href = URL.createObjectURL(blob);
  a.download = `llava-next-chats-${new Date().toISOString().slice(0, 10)}.json`;
  a.click();
  setTimeout(() => URL.revokeObjectURL(a.href), 10000);
}

function closeSidebar() {
  ui.sidebar.classList.remove("open");
  $("toggle-sidebar").setAttribute("aria-expanded", "false");
}

// ------------------------------------------------------------------ talking to the server

async function loadModel() {
  try {
    const names = await listModels(apiKey);
    model = names[0] || null;
    ui.model.textContent = model || "(no model)";
    say("");
  } catch (err) {
    model = null;
    ui.model.textContent = "(model unknown)";
    say(describe(err).replace("\n", " "));
    if (err instanceof ApiError && err.status === 401) openSettings(true);
  }
}

function requestMessages(conv) {
  const out = [];
  if (settings.system.trim()) out.push({ role: "system", content: settings.system });
  for (const m of conv.messages) {
    if (m.role === "user") {
      const images = (m.images || []).map((url) => ({ type: "image_url", image_url: { url } }));
      out.push({ role: "user", content: images.length ? [...images, { type: "text", text: m.text }] : m.text });
    } else if (m.text) {
      out.push({ role: "assistant", content: m.text });
    }
  }
  return out;
}

async function answer() {
  const conv = current();
  if (!model) await loadModel();
  const message = { role: "assistant", text: "" };
  const body = {
    model: model || "default", messages: requestMessages(conv), temperature: Number(settings.temperature),
    top_p: Number(settings.top_p), max_tokens: Number(settings.max_tokens),
  };
  if (settings.seed !== "" && settings.seed !== null) body.seed = Number(settings.seed);
  conv.messages.push(message);
  running = { controller: new AbortController(), message };
  draw();
  const node = ui.messages.lastElementChild;
  const start = performance.now();
  let first = null, pending = false;
  const redraw = () => {
    pending = false;
    fillAssistant(node, message, running && running.message === message);
    ui.messages.scrollTop = ui.messages.scrollHeight;
  };
  say("generating\u2026");
  try {
    for await (const event of streamChat(body, apiKey, running.controller.signal)) {
      if (event.delta) {
        first ??= performance.now();
        message.text += event.delta;
        if (!pending) { pending = true; requestAnimationFrame(redraw); }
      } else if (event.finish) {
        message.meta = { ...message.meta, finish: event.finish };
      } else if (event.usage) {
        const end = performance.now();
        const n = event.usage.completion_tokens;
        message.meta = {
          ...message.meta, usage: event.usage, seconds: (end - start) / 1000,
          ttft: first === null ? undefined : (first - start) / 1000,
          tps: n / ((end - start) / 1000),  // end to end, from sending to the last token
        };
      }
    }
    say("");
  } catch (err) {
    if (err.name === "AbortError") {
      message.meta = { stopped: true, seconds: (performance.now() - start) / 1000 };
      say("stopped");
    } else {
      message.error = describe(err);
      say("the server answered with an error");
      if (err instanceof ApiError && err.status === 401) openSettings(true);
    }
  } finally {
    running = null;
    if (conv.title === "New chat") conv.title = (conv.messages[0]?.text || "Image").slice(0, 60) || "Image";
    save();
    draw();
  }
}

function send() {
  if (running) return;
  const text = ui.prompt.value.trim();
  if (!text && !attachments.urls.length) return;
  current().messages.push({ role: "user", text, images: attachments.take() });
  ui.prompt.value = "";
  answer();
}

function regenerate() {
  if (running) return;
  const conv = current();
  if (conv.messages.at(-1)?.role === "assistant") conv.messages.pop();
  if (conv.messages.length) answer();
}

function stop() {
  if (running) running.controller.abort();
}

// ------------------------------------------------------------------ settings and wiring

function openSettings(show) {
  ui.settings.hidden = !show;
  $("toggle-settings").setAttribute("aria-expanded", String(show));
  if (show && !apiKey) ui.key.focus();
}

function wireSettings() {
  ui.key.value = apiKey;
  ui.system.value = settings.system;
  ui.temperature.value = settings.temperature;
  ui.topP.value = settings.top_p;
  ui.maxTokens.value = settings.max_tokens;
  ui.seed.value = settings.seed;
  ui.key.addEventListener("change", () => { apiKey = ui.key.value.trim(); store.saveKey(apiKey); loadModel(); });
  const fields = [[ui.system, "system"], [ui.temperature, "temperature"], [ui.topP, "top_p"],
    [ui.maxTokens, "max_tokens"], [ui.seed, "seed"]];
  for (const [field, name] of fields) {
    field.addEventListener("input", () => {
      const blank = field.value === "";
      settings[name] = field.type !== "number" ? field.value : blank ? store.DEFAULTS[name] : Number(field.value);
      store.saveSettings(settings);
    });
  }
  $("toggle-settings").addEventListener("click", () => openSettings(ui.settings.hidden));
}

function main() {
  wireSettings();
  wire(attachments, { button: $("attach"), input: $("file-input"), overlay: $("drop-overlay") });
  ui.composer.addEventListener("submit", (e) => { e.preventDefault(); send(); });
  ui.stop.addEventListener("click", stop);
  ui.prompt.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); send(); }
  });
  document.addEventListener("keydown", (e) => { if (e.key === "Escape" && running) { e.preventDefault(); stop(); } });
  $("new-chat").addEventListener("click", () => {
    if (running) return;
    const conv = store.newConversation();
    data.conversations.unshift(conv);
    data.current = conv.id;
    save();
    draw();
    closeSidebar();
    ui.prompt.focus();
  });
  $("export").addEventListener("click", exportAll);
  $("toggle-sidebar").addEventListener("click", () => {
    const open = ui.sidebar.classList.toggle("open");
    $("toggle-sidebar").setAttribute("aria-expanded", String(open));
  });
  draw();
  loadModel();
  ui.prompt.focus();
}

main();
