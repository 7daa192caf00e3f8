// The cllm playground: chat and raw completion, embeddings, a text's tokens and the server's status, through the
// server's own API routes, as any other client calls them.
//
// What a model writes, what a user types and what a file imports are text, and reach the page only through text
// nodes (textContent, append(string)): the markdown subset below builds elements around that text and never
// parses HTML. The server's Content-Security-Policy allows no inline script or style attribute, so styles are set
// through classes and CSSOM (style.setProperty). The page reads nothing from its address: a link cannot make it
// send anything.

const STORAGE = {
  conversations: "cllm.conversations",
  current: "cllm.current-conversation",
  settings: "cllm.sampling",
  key: "cllm.api-key",
};
const EXPORT_FORMAT = "cllm-playground-conversations";
const COMPLETION_MAX_TOKENS = 200; // a raw completion's length when max tokens is empty (the API's default is 16)
const HEALTH_INTERVAL_MS = 2000;
const SAVE_INTERVAL_MS = 1000; // a streaming reply is saved at most this often, and once more at its end
const MIN_DECODING_MS = 50; // less time than this between a reply's first piece and its end cannot be measured
const NUMBER_SETTINGS = ["temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
  "repetition_penalty", "max_tokens", "seed"];

const $ = (id) => document.getElementById(id);

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

// ---- storage: a browser that refuses it (private modes, a full quota) still gets a working page

function readStored(storage, key) {
  try {
    return storage.getItem(key);
  } catch {
    return null;
  }
}

function writeStored(storage, key, value) {
  try {
    if (value === null) storage.removeItem(key);
    else storage.setItem(key, value);
    return true;
  } catch (error) {
    showError(new Error(`The browser did not store the data (${error.message}).`));
    return false;
  }
}

function readJSON(key, fallback) {
  try {
    return JSON.parse(readStored(localStorage, key)) ?? fallback;
  } catch {
    return fallback;
  }
}

// ---- the API

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

function apiKey() {
  return $("api-key").value.trim();
}

// fetch(path) with the key; an answer that is not 2xx becomes an ApiError with the server's own message.
async function api(path, { body, signal } = {}) {
  const headers = {};
  if (apiKey()) headers.Authorization = `Bearer ${apiKey()}`;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let response;
  try {
    response = await fetch(path, {
      method: body === undefined ? "GET" : "POST", headers, signal,
      body: body === undefined ? undefined : JSON.stringify(body),
    });
  } catch (error) {
    if (error.name === "AbortError") throw error;
    throw new ApiError(0, `The server did not answer (${error.message}).`);
  }
  if (!response.ok) throw new ApiError(response.status, await errorMessage(response));
  return response;
}

// The message of an error answer: OpenAI's {"error": {"message"}}, or TEI's {"error": message}.
async function errorMessage(response) {
  const text = await response.text();
  try {
    const error = JSON.parse(text).error;
    const message = typeof error === "string" ? error : error?.message;
    if (typeof message === "string" && message) return message;
  } catch {
    // not JSON: the text itself, below
  }
  return text.trim() || `${response.status} ${response.statusText}`;
}

async function getJSON(path) {
  return (await api(path)).json();
}

async function postJSON(path, body) {
  return (await api(path, { body })).json();
}

// ---- the banner: the last error, in the server's words

function showError(error) {
  const banner = $("banner");
  banner.textContent = error.message;
  if (error instanceof ApiError && error.status) banner.dataset.status = String(error.status);
  else delete banner.dataset.status;
  banner.hidden = false;
}

function clearBanner() {
  const banner = $("banner");
  banner.textContent = "";
  delete banner.dataset.status;
  banner.hidden = true;
}

// ---- the model served: its name (/v1/models) and what /info says of it

// The server says in the page whether its API wants a key: without one typed in, the page asks for it rather than
// calling the API for a 401.
const KEY_REQUIRED = document.querySelector('meta[name="cllm-api-key"]')?.content === "required";
const KEY_WANTED = "This server wants an API key: type it in the API key field.";

const server = { model: null, info: null, error: null, key: null }; // key: the one they were asked with

async function loadModel() {
  const key = apiKey();
  clearBanner();
  const found = { model: null, info: null, error: null, key };
  if (KEY_REQUIRED && !key) {
    found.error = new Error(KEY_WANTED);
  } else {
    try {
      found.model = (await getJSON("/v1/models")).data[0].id;
      found.info = await getJSON("/info");
    } catch (error) {
      found.error = error;
    }
  }
  Object.assign(server, found);
  $("model-name").textContent = server.model ?? "—";
  $("api-key").classList.toggle("wanted", KEY_REQUIRED && !key);
  if (server.error && server.error.message !== KEY_WANTED) showError(server.error);
  applyInfo();
}

// True, and says so, when the server wants a key and none is typed in: nothing is sent without one.
function keyMissing() {
  if (!KEY_REQUIRED || apiKey()) return false;
  showError(new Error(KEY_WANTED));
  $("api-key").focus();
  return true;
}

// The name to send as `model`, asked of the server again if the last try failed or was made with another key.
async function modelName() {
  if (server.model === null || server.key !== apiKey()) await loadModel();
  if (server.model === null) throw server.error;
  return server.model;
}

function hasChatTemplate() {
  return server.info?.chat_template !== false;
}

function applyInfo() {
  const info = server.info;
  $("mode").options[0].disabled = !hasChatTemplate();
  const template = hasChatTemplate() ? "the model's template" : "this model has no template";
  $("mode").options[0].textContent = `Chat (${template})`;
  if (info) $("settings").elements.max_tokens.max = String(info.limits.max_completion_tokens);
  if (current?.mode === "chat" && !hasChatTemplate()) current.mode = "completion";
  renderConversationList();
  showMode();
  renderStatus();
}

function defaultMode() {
  return hasChatTemplate() ? "chat" : "completion";
}

// ---- the API key: for this tab (sessionStorage), or remembered (localStorage) when the box is ticked

function loadKey() {
  const remembered = readStored(localStorage, STORAGE.key);
  $("api-key").value = remembered ?? readStored(sessionStorage, STORAGE.key) ?? "";
  $("remember-key").checked = remembered !== null;
}

function saveKey() {
  const key = apiKey() || null;
  const remember = $("remember-key").checked;
  writeStored(localStorage, STORAGE.key, remember ? key : null);
  writeStored(sessionStorage, STORAGE.key, remember ? null : key);
}

// ---- tabs

let healthTimer = null;

function showTab(name) {
  for (const button of document.querySelectorAll("nav button[data-tab]")) {
    const selected = button.dataset.tab === name;
    button.setAttribute("aria-selected", String(selected));
    button.tabIndex = selected ? 0 : -1;
    $(`tab-${button.dataset.tab}`).hidden = !selected;
  }
  clearInterval(healthTimer);
  healthTimer = null;
  if (name === "status") {
    refreshHealth();
    healthTimer = setInterval(refreshHealth, HEALTH_INTERVAL_MS);
    if (!server.info) loadModel();
  }
}

// ---- markdown: a small subset, built as elements around text nodes

const FENCE = /^\s{0,3}(`{3,}|~{3,})\s*([^\s`]*)/;
const BULLET = /^\s{0,3}[-*+]\s+(.*)$/;
const NUMBERED = /^\s{0,3}(\d{1,9})[.)]\s+(.*)$/;
// inline code | **strong** | __strong__ | *em* | _em_ | [label](http(s) url) | a bare http(s) url
const INLINE = new RegExp([
  /`([^`\n]+)`/.source,
  /\*\*(?=\S)([^\n]*?\S)\*\*/.source,
  /(?<!\w)__(?=\S)([^\n]*?\S)__(?!\w)/.source,
  /(?<![\w*])\*(?=[^\s*])([^*\n]*?[^\s*])\*(?![\w*])/.source,
  /(?<![\w_])_(?=[^\s_])([^_\n]*?[^\s_])_(?![\w_])/.source,
  /\[([^\]\n]+)\]\((https?:\/\/[^\s()]+)\)/.source,
  /(https?:\/\/[^\s<>()"'`]*[^\s<>()"'`.,;:!?])/.source,
].join("|"), "g");

function renderMarkdown(text) {
  const fragment = document.createDocumentFragment();
  const lines = text.split("\n");
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    const fence = FENCE.exec(line);
    if (fence) {
      const [, marker, language] = fence;
      const body = [];
      for (i += 1; i < lines.length && !closesFence(lines[i], marker); i += 1) body.push(lines[i]);
      i += 1; // the closing fence (a reply still streaming may not have written it yet)
      fragment.append(codeBlock(body.join("\n"), language));
    } else if (BULLET.test(line) || NUMBERED.test(line)) {
      const numbered = NUMBERED.exec(line);
      const pattern = numbered ? NUMBERED : BULLET;
      const list = element(numbered ? "ol" : "ul");
      if (numbered && numbered[1] !== "1") list.start = Number(numbered[1]);
      for (; i < lines.length && pattern.test(lines[i]); i += 1) {
        const item = element("li");
        appendInline(item, pattern.exec(lines[i]).at(-1));
        list.append(item);
      }
      fragment.append(list);
    } else if (line.trim() === "") {
      i += 1;
    } else {
      const paragraph = [];
      for (; i < lines.length && lines[i].trim() !== "" && !startsBlock(lines[i]); i += 1) paragraph.push(lines[i]);
      const node = element("p");
      appendInline(node, paragraph.join("\n"));
      fragment.append(node);
    }
  }
  return fragment;
}

function closesFence(line, marker) {
  const trimmed = line.trim();
  return trimmed.length >= marker.length && trimmed === marker[0].repeat(trimmed.length);
}

function startsBlock(line) {
  return FENCE.test(line) || BULLET.test(line) || NUMBERED.test(line);
}

function codeBlock(code, language) {
  const block = element("div", "code-block");
  const bar = element("div", "code-bar", language || "code");
  const copy = element("button", "copy-code small", "Copy");
  copy.type = "button";
  copy.addEventListener("click", () => copyText(copy, code));
  bar.append(copy);
  const pre = element("pre");
  pre.append(element("code", null, code));
  block.append(bar, pre);
  return block;
}

function appendInline(parent, text) {
  let last = 0;
  for (const match of text.matchAll(INLINE)) {
    const [whole, code, strong, strongUnderscored, em, emUnderscored, label, href, url] = match;
    parent.append(text.slice(last, match.index));
    if (code !== undefined) {
      parent.append(element("code", null, code));
    } else if (strong !== undefined || strongUnderscored !== undefined) {
      const node = element("strong");
      appendInline(node, strong ?? strongUnderscored);
      parent.append(node);
    } else if (em !== undefined || emUnderscored !== undefined) {
      const node = element("em");
      appendInline(node, em ?? emUnderscored);
      parent.append(node);
    } else {
      parent.append(link(label ?? url, href ?? url) ?? whole);
    }
    last = match.index + whole.length;
  }
  parent.append(text.slice(last));
}

// An http(s) link that opens in a new tab and tells the site nothing of this page; null for any other address.
function link(text, address) {
  let url;
  try {
    url = new URL(address);
  } catch {
    return null;
  }
  if (url.protocol !== "http:" && url.protocol !== "https:") return null;
  const anchor = element("a", null, text);
  anchor.href = url.href;
  anchor.target = "_blank";
  anchor.rel = "noopener noreferrer";
  return anchor;
}

// ---- copying

async function copyText(button, text) {
  let copied = false;
  try {
    await navigator.clipboard.writeText(text);
    copied = true;
  } catch {
    // no clipboard API (a page served over plain http to another machine): the older way
    const scratch = element("textarea");
    scratch.value = text;
    document.body.append(scratch);
    scratch.select();
    copied = document.execCommand("copy");
    scratch.remove();
  }
  const label = button.textContent;
  button.textContent = copied ? "Copied" : "Copy failed";
  setTimeout(() => { button.textContent = label; }, 1200);
}

// ---- conversations, kept in localStorage

let conversations = [];
let current = null;
let streaming = null; // the reply being written: {controller, reply, node}
let lastSave = 0;

function newId() {
  return `${Date.now().toString(36)}-${Math.random().toString(36).slice(2, 10)}`;
}

function newConversation() {
  return { id: newId(), title: "", mode: current?.mode ?? defaultMode(), system: $("system-prompt").value,
    messages: [], updated: Date.now() };
}

// An imported or stored conversation, kept to the fields and types the page uses; null if it is not one.
function cleanConversation(data) {
  if (!data || typeof data !== "object" || !Array.isArray(data.messages)) return null;
  const mode = data.mode === "completion" ? "completion" : "chat";
  const messages = data.messages
    .filter((m) => m && (m.role === "user" || m.role === "assistant") && typeof m.content === "string")
    .map((m) => {
      const message = { role: m.role, content: m.content };
      message.mode = ["chat", "completion"].includes(m.mode) ? m.mode : mode;
      if (m.role === "assistant") {
        // a reply that was streaming when the page went away was cut short
        message.state = ["done", "stopped", "error"].includes(m.state) ? m.state : "stopped";
        message.stats = typeof m.stats === "string" ? m.stats : "";
      }
      return message;
    });
  return {
    id: typeof data.id === "string" && data.id ? data.id : newId(),
    title: typeof data.title === "string" ? data.title.slice(0, 200) : "",
    mode,
    system: typeof data.system === "string" ? data.system : "",
    messages,
    updated: Number.isFinite(data.updated) ? data.updated : Date.now(),
  };
}

function loadConversations() {
  const stored = readJSON(STORAGE.conversations, []);
  conversations = (Array.isArray(stored) ? stored : []).map(cleanConversation).filter(Boolean);
  const currentId = readStored(localStorage, STORAGE.current);
  current = conversations.find((c) => c.id === currentId) ?? null;
}

function saveConversations() {
  lastSave = Date.now();
  const kept = conversations.filter((c) => c.messages.length > 0 || c === current);
  if (writeStored(localStorage, STORAGE.conversations, JSON.stringify(kept))) {
    writeStored(localStorage, STORAGE.current, current?.id ?? null);
  }
}

function touch(conversation) {
  conversation.updated = Date.now();
  if (!conversation.title) {
    const first = conversation.messages.find((m) => m.role === "user");
    if (first) conversation.title = first.content.trim().split("\n")[0].slice(0, 80);
  }
}

function openConversation(conversation) {
  if (conversation === current) return;
  if (streaming) streaming.controller.abort();
  current = conversation;
  if (!conversations.includes(conversation)) conversations.push(conversation);
  if (current.mode === "chat" && !hasChatTemplate()) current.mode = "completion";
  saveConversations();
  showConversation();
}

function startConversation() {
  if (current && current.messages.length === 0) {
    $("prompt").focus();
    return;
  }
  openConversation(newConversation());
  $("prompt").focus();
}

function deleteConversation(conversation) {
  if (streaming && conversation === current) streaming.controller.abort();
  conversations = conversations.filter((c) => c !== conversation);
  if (conversation === current) {
    current = [...conversations].sort((a, b) => b.updated - a.updated)[0] ?? newConversation();
    if (!conversations.includes(current)) conversations.push(current);
  }
  saveConversations();
  showConversation();
}

function renderConversationList() {
  const list = $("conversations");
  list.replaceChildren();
  const shown = conversations.filter((c) => c.messages.length > 0 || c === current)
    .sort((a, b) => b.updated - a.updated);
  for (const conversation of shown) {
    const item = element("li", "conversation");
    if (conversation === current) {
      item.classList.add("active");
      item.setAttribute("aria-current", "true");
    }
    item.tabIndex = 0;
    const turns = conversation.messages.filter((m) => m.role === "user").length;
    item.append(element("span", "title", conversation.title || "New conversation"),
      element("span", "meta", `${counted(turns, "turn")} · ${conversation.mode}`));
    const remove = element("button", "delete small", "×");
    remove.type = "button";
    remove.title = "delete this conversation";
    remove.setAttribute("aria-label", "Delete conversation");
    remove.addEventListener("click", (event) => {
      event.stopPropagation();
      deleteConversation(conversation);
    });
    item.append(remove);
    item.addEventListener("click", () => openConversation(conversation));
    item.addEventListener("keydown", (event) => {
      if (event.key === "Enter" && event.target === item) openConversation(conversation);
    });
    list.append(item);
  }
}

function showConversation() {
  renderConversationList();
  showMode();
  const messages = $("messages");
  messages.replaceChildren(...current.messages.map(messageNode));
  $("empty-hint").hidden = current.messages.length > 0;
  messages.scrollTop = messages.scrollHeight;
  updateButtons();
}

function showMode() {
  const chat = current.mode === "chat";
  $("mode").value = current.mode;
  $("system-prompt").value = current.system;
  $("system-prompt").disabled = !chat;
  $("system-field").classList.toggle("disabled", !chat);
  $("prompt").placeholder = chat ? "Message" : "Text for the model to continue";
  // what an empty max tokens means (requestFor): a chat reply runs to its end, a completion has a default length
  const limit = server.info?.limits.max_completion_tokens;
  $("settings").elements.max_tokens.placeholder = chat ? (limit ? `auto (≤ ${limit})` : "auto")
    : String(Math.min(COMPLETION_MAX_TOKENS, limit ?? COMPLETION_MAX_TOKENS));
}

function exportConversations() {
  const kept = conversations.filter((c) => c.messages.length > 0);
  const exported = { format: EXPORT_FORMAT, version: 1, exported: new Date().toISOString(), conversations: kept };
  const blob = new Blob([JSON.stringify(exported, null, 2)], { type: "application/json" });
  const anchor = element("a");
  anchor.href = URL.createObjectURL(blob);
  anchor.download = `cllm-conversations-${new Date().toISOString().slice(0, 10)}.json`;
  document.body.append(anchor);
  anchor.click();
  anchor.remove();
  setTimeout(() => URL.revokeObjectURL(anchor.href), 10000);
}

async function importConversations(file) {
  clearBanner();
  try {
    const data = JSON.parse(await file.text());
    const list = Array.isArray(data) ? data : data?.conversations;
    if (!Array.isArray(list)) throw new Error("no list of conversations");
    const imported = list.map(cleanConversation).filter((c) => c && c.messages.length > 0);
    if (imported.length === 0) throw new Error("no conversation with messages");
    const ids = new Set(conversations.map((c) => c.id));
    for (const conversation of imported) {
      if (ids.has(conversation.id)) conversation.id = newId();
      ids.add(conversation.id);
      conversations.push(conversation);
    }
    openConversation(imported[0]);
  } catch (error) {
    showError(new Error(`${file.name} is not an export of this page's conversations (${error.message}).`));
  }
}

// ---- messages

function messageNode(message) {
  const node = element("article", "message");
  node.dataset.role = message.role;
  const head = element("div", "message-head");
  const completion = message.mode === "completion";
  const who = message.role === "user" ? (completion ? "Prompt" : "You") : (completion ? "Continuation" : "Model");
  head.append(element("span", "role", who));
  const copy = element("button", "copy small", "Copy");
  copy.type = "button";
  copy.title = "copy this message's text";
  copy.addEventListener("click", () => copyText(copy, message.content));
  head.append(copy);
  node.append(head, element("div", "content"));
  if (message.role === "assistant") node.append(element("div", "stats"));
  renderMessage(node, message);
  return node;
}

function renderMessage(node, message) {
  const content = node.querySelector(".content");
  // A user's text and a raw continuation are shown as written; a chat reply as markdown.
  const plain = message.role === "user" || message.mode === "completion";
  if (plain) content.textContent = message.content;
  else content.replaceChildren(renderMarkdown(message.content));
  content.classList.toggle("plain", plain);
  if (message.role === "assistant") {
    node.dataset.state = message.state;
    node.querySelector(".stats").textContent = message.stats;
  }
}

function appendMessage(message) {
  const node = messageNode(message);
  $("messages").append(node);
  $("empty-hint").hidden = true;
  return node;
}

// Scrolls the newest message into view, unless the reader has scrolled up to read something earlier.
function followReply(node, force = false) {
  const messages = $("messages");
  const scroller = messages.scrollHeight > messages.clientHeight + 1 ? messages : document.scrollingElement;
  const nearBottom = scroller.scrollHeight - scroller.scrollTop - scroller.clientHeight < 120;
  if (force || nearBottom) node.scrollIntoView({ block: "end" });
}

function updateButtons() {
  const busy = streaming !== null;
  $("send").disabled = busy;
  $("stop").disabled = !busy;
  $("regenerate").disabled = busy || !current?.messages.some((m) => m.role === "user");
}

// ---- generation

// The sampling fields the user set, as numbers; stop strings one per line.
function samplingSettings() {
  const fields = $("settings").elements;
  const settings = {};
  for (const name of NUMBER_SETTINGS) {
    const text = fields[name].value.trim();
    if (text !== "") settings[name] = Number(text);
  }
  const stop = fields.stop.value.split("\n").filter((line) => line !== "");
  if (stop.length) settings.stop = stop;
  return settings;
}

function requestFor(conversation, model) {
  const settings = samplingSettings();
  if (conversation.mode === "completion") {
    const prompt = conversation.messages.findLast((m) => m.role === "user").content;
    const limit = server.info?.limits.max_completion_tokens ?? COMPLETION_MAX_TOKENS;
    return { path: "/v1/completions",
      body: { model, prompt, max_tokens: Math.min(COMPLETION_MAX_TOKENS, limit), ...settings } };
  }
  const messages = conversation.messages.filter((m) => m.content !== "")
    .map((m) => ({ role: m.role, content: m.content }));
  if (conversation.system.trim()) messages.unshift({ role: "system", content: conversation.system });
  // Without max_tokens the server lets a reply run to its end, as OpenAI's API does.
  return { path: "/v1/chat/completions", body: { model, messages, ...settings } };
}

async function send() {
  const text = $("prompt").value;
  if (streaming || text.trim() === "" || keyMissing()) return;
  clearBanner();
  current.messages.push({ role: "user", content: text, mode: current.mode });
  touch(current);
  $("prompt").value = "";
  followReply(appendMessage(current.messages.at(-1)), true);
  await generate();
}

async function regenerate() {
  if (streaming || keyMissing()) return;
  clearBanner();
  while (current.messages.length && current.messages.at(-1).role === "assistant") current.messages.pop();
  if (current.messages.length === 0) return;
  showConversation();
  await generate();
}

async function generate() {
  const conversation = current;
  const reply = { role: "assistant", content: "", mode: conversation.mode, state: "streaming", stats: "" };
  conversation.messages.push(reply);
  touch(conversation);
  const node = appendMessage(reply);
  const controller = new AbortController();
  streaming = { controller, reply, node };
  updateButtons();
  saveConversations();
  renderConversationList();
  followReply(node, true);

  const started = performance.now();
  let firstAt = null;
  let usage = null;
  let finishReason = null;
  let rendering = false;
  const show = () => { // at most once a frame, however fast the pieces come
    if (rendering) return;
    rendering = true;
    requestAnimationFrame(() => {
      rendering = false;
      renderMessage(node, reply);
      followReply(node);
    });
  };
  try {
    const { path, body } = requestFor(conversation, await modelName());
    const response = await api(path, {
      body: { ...body, stream: true, stream_options: { include_usage: true } }, signal: controller.signal });
    let ended = false;
    for await (const data of serverSentEvents(response.body)) {
      if (data === "[DONE]") {
        ended = true;
        break;
      }
      const event = JSON.parse(data);
      if (event.error) throw new ApiError(0, event.error.message); // after the 200: no status of its own
      if (event.usage) usage = event.usage;
      for (const choice of event.choices ?? []) {
        const piece = reply.mode === "chat" ? choice.delta?.content : choice.text;
        if (piece) {
          firstAt ??= performance.now();
          reply.content += piece;
          show();
        }
        finishReason = choice.finish_reason ?? finishReason;
      }
      if (Date.now() - lastSave > SAVE_INTERVAL_MS) saveConversations();
    }
    if (!ended) throw new ApiError(0, "The server closed the stream before the reply's end.");
    reply.state = "done";
    reply.stats = replyStats(started, firstAt, performance.now(), usage, finishReason);
  } catch (error) {
    if (error.name === "AbortError") {
      reply.state = "stopped";
      reply.stats = `stopped${firstAt === null ? "" : ` · TTFT ${duration(firstAt - started)}`}` +
        ` · after ${duration(performance.now() - started)}`;
    } else {
      reply.state = "error";
      reply.stats = `error: ${error.message}`;
      showError(error);
    }
  } finally {
    streaming = null;
    renderMessage(node, reply);
    touch(conversation);
    saveConversations();
    renderConversationList();
    updateButtons();
  }
}

// The data of each server-sent event in a response body, as text ("[DONE]" included); comments (the server's
// keep-alives) skipped.
async function* serverSentEvents(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let data = [];
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += value;
      let newline;
      while ((newline = buffer.indexOf("\n")) >= 0) {
        const line = buffer.slice(0, newline).replace(/\r$/, "");
        buffer = buffer.slice(newline + 1);
        if (line === "" && data.length) {
          yield data.join("\n");
          data = [];
        } else if (line.startsWith("data:")) {
          data.push(line.slice(5).replace(/^ /, ""));
        }
      }
    }
  } finally {
    reader.cancel().catch(() => {}); // a reply left early (an error event): let the connection go
  }
}

function duration(ms) {
  return ms < 1000 ? `${Math.round(ms)} ms` : `${(ms / 1000).toFixed(2)} s`;
}

// "TTFT 12 ms · 45.3 tok/s · 24 tokens · prompt 31". The rate is the decoding's: the tokens after the first over
// the time after it, unless they came in one burst (a tiny model, a proxy that buffers), whose time says nothing:
// then the whole reply's tokens over the whole request's time.
function replyStats(started, firstAt, ended, usage, finishReason) {
  const tokens = usage?.completion_tokens ?? 0;
  const parts = [`TTFT ${firstAt === null ? "–" : duration(firstAt - started)}`];
  const decoding = firstAt === null ? 0 : ended - firstAt;
  const rate = tokens > 1 && decoding >= MIN_DECODING_MS ? (tokens - 1) / (decoding / 1000)
    : tokens / ((ended - started) / 1000);
  parts.push(`${rate.toFixed(1)} tok/s`, counted(tokens, "token"));
  if (usage) parts.push(`prompt ${usage.prompt_tokens}`);
  if (finishReason === "length") parts.push("cut at max tokens");
  return parts.join(" · ");
}

// ---- sampling settings, kept between visits

function loadSettings() {
  const saved = readJSON(STORAGE.settings, {});
  for (const field of $("settings").elements) {
    if (field.name && typeof saved[field.name] === "string") field.value = saved[field.name];
  }
}

function saveSettings() {
  const values = {};
  for (const field of $("settings").elements) if (field.name && field.value !== "") values[field.name] = field.value;
  writeStored(localStorage, STORAGE.settings, JSON.stringify(values));
}

// ---- embeddings: each text against each other

async function compareEmbeddings() {
  if (keyMissing()) return;
  clearBanner();
  const texts = $("embed-input").value.split("\n").filter((line) => line.trim() !== "");
  if (texts.length === 0) {
    $("embed-info").textContent = "Write a text or more, one per line.";
    return;
  }
  const button = $("embed-run");
  button.disabled = true;
  try {
    const model = await modelName();
    // /tokenize gives each text's tokens as the embedding reads them (the same prompt and special tokens).
    const [embeddings, tokens] = await Promise.all([
      postJSON("/v1/embeddings", { model, input: texts }),
      postJSON("/tokenize", { inputs: texts }),
    ]);
    const vectors = embeddings.data.sort((a, b) => a.index - b.index).map((d) => unit(d.embedding));
    const similarity = vectors.map((a) => vectors.map((b) => dot(a, b)));
    renderSimilarity(texts, similarity);
    const counts = tokens.map((pieces) => pieces.length);
    $("embed-info").textContent = `${counted(texts.length, "text")} · ` +
      `${vectors[0].length} dimensions · tokens per text: ${counts.join(", ")} ` +
      `(${embeddings.usage.prompt_tokens} in all)`;
  } catch (error) {
    showError(error);
  } finally {
    button.disabled = false;
  }
}

function dot(a, b) {
  let sum = 0;
  for (let i = 0; i < a.length; i += 1) sum += a[i] * b[i];
  return sum;
}

function unit(vector) {
  const norm = Math.sqrt(dot(vector, vector)) || 1;
  return vector.map((x) => x / norm);
}

function renderSimilarity(texts, similarity) {
  const others = similarity.flatMap((row, i) => row.filter((_, j) => j !== i));
  const low = others.reduce((a, b) => Math.min(a, b), 1);
  const high = others.reduce((a, b) => Math.max(a, b), low);
  const table = $("similarity");
  const head = element("tr");
  head.append(element("th"));
  texts.forEach((text, j) => {
    const th = element("th", "column", String(j + 1));
    th.scope = "col";
    th.title = text;
    head.append(th);
  });
  const thead = element("thead");
  thead.append(head);
  const tbody = element("tbody");
  similarity.forEach((row, i) => {
    const nearest = row.reduce((best, value, j) => (j !== i && (best < 0 || value > row[best]) ? j : best), -1);
    const tr = element("tr");
    const th = element("th", "row-label");
    th.scope = "row";
    th.title = texts[i];
    th.append(element("span", "index", String(i + 1)), element("span", "text", texts[i]));
    tr.append(th);
    row.forEach((value, j) => {
      const td = element("td", null, value.toFixed(3));
      td.dataset.i = String(i);
      td.dataset.j = String(j);
      const heat = i === j ? 1 : (high > low ? (value - low) / (high - low) : 1);
      td.style.setProperty("--heat", heat.toFixed(3)); // CSSOM, which the page's CSP allows
      if (heat > 0.6) td.classList.add("strong");
      if (i === j) td.classList.add("self");
      if (j === nearest) {
        td.classList.add("nearest");
        td.title = `the nearest text to ${i + 1}`;
      }
      tr.append(td);
    });
    tbody.append(tr);
  });
  table.replaceChildren(thead, tbody);
}

// ---- tokenizer

async function tokenize() {
  if (keyMissing()) return;
  clearBanner();
  const text = $("tokenize-input").value;
  if (text === "") {
    $("tokens").replaceChildren();
    $("token-count").textContent = "0 tokens";
    return;
  }
  const button = $("tokenize-run");
  button.disabled = true;
  try {
    // TEI's shape of /tokenize gives each token's span in the text; llama.cpp's gives only its piece.
    const [pieces] = await postJSON("/tokenize", { inputs: text, add_special_tokens: $("add-special").checked });
    $("tokens").replaceChildren(...pieces.map(tokenChip));
    $("token-count").textContent = `${counted(pieces.length, "token")} · ` +
      `${[...text].length} characters`;
  } catch (error) {
    showError(error);
  } finally {
    button.disabled = false;
  }
}

const VISIBLE_WHITESPACE = { " ": "·", "\n": "↵", "\t": "→", "\r": "␍" };

// A token's piece with its whitespace drawn (dimmed marks), its id shown by the style sheet (data-id).
function tokenChip(piece, index) {
  const chip = element("span", `token hue-${index % 6}`);
  const text = element("span", "piece");
  for (const part of piece.text.split(/([ \n\t\r]+)/)) {
    const whitespace = /^[ \n\t\r]+$/.test(part);
    if (whitespace) text.append(element("span", "whitespace", part.replace(/./gs, (c) => VISIBLE_WHITESPACE[c])));
    else if (part) text.append(part);
  }
  chip.append(text);
  chip.dataset.id = String(piece.id);
  chip.title = piece.special ? `id ${piece.id} · special` : `id ${piece.id} · chars ${piece.start}–${piece.stop}`;
  if (piece.special) chip.classList.add("special");
  chip.tabIndex = 0;
  const describe = () => { $("token-detail").textContent = `${JSON.stringify(piece.text)} · ${chip.title}`; };
  chip.addEventListener("mouseenter", describe);
  chip.addEventListener("focus", describe);
  return chip;
}

// ---- status

function renderStatus() {
  const info = server.info;
  const list = $("status");
  if (!info) {
    list.replaceChildren(...facts([["model", server.model ?? "—"]]));
    return;
  }
  const config = info.config;
  const engine = info.engine;
  list.replaceChildren(...facts([
    ["model", info.model],
    ["architecture", config.arch ?? "gpt2"], // a GPT-2 config leaves out its arch (ModelConfig.to_dict)
    ["context", `${config.context_length} tokens`],
    ["quantization", info.quantization.length ? info.quantization.join(", ") : "none (float32)"],
    ["parameters", formatCount(info.parameters)],
    ["layers · dim · heads", `${config.n_layers} · ${config.dim} · ${config.n_heads}`],
    ["tokenizer", `${engine.tokenizer}, ${engine.vocab_size.toLocaleString("en")} tokens`],
    ["chat template", info.chat_template ? "yes" : "no"],
    ["pooling", engine.pooling],
    ["limits", `${counted(info.limits.max_completion_tokens, "token")} per reply, ` +
      `${counted(info.limits.max_input_tokens, "token")} per prompt or text to embed`],
    ["engine", `${counted(engine.limits.threads, "thread")} · ${counted(engine.limits.max_streams, "decoder slot")}`],
  ]));
}

function counted(n, noun) {
  return `${n.toLocaleString("en")} ${noun}${n === 1 ? "" : "s"}`;
}

function facts(pairs) {
  return pairs.flatMap(([name, value]) => [element("dt", null, name), element("dd", null, String(value))]);
}

function formatCount(count) {
  const [scale, unit] = count >= 1e9 ? [1e9, "B"] : count >= 1e6 ? [1e6, "M"] : count >= 1e3 ? [1e3, "K"] : [1, ""];
  return scale === 1 ? String(count) : `${(count / scale).toFixed(1)}${unit} (${count.toLocaleString("en")})`;
}

async function refreshHealth() {
  const list = $("health");
  let health;
  try {
    const response = await fetch("/health"); // open to all, and a 503 still says why
    health = await response.json();
  } catch (error) {
    list.replaceChildren(...facts([["state", `unreachable (${error.message})`]]));
    list.dataset.state = "unreachable";
    return;
  }
  const rows = [["state", health.status]];
  if ("slots_idle" in health) {
    rows.push(["slots", `${health.slots_idle} idle · ${health.slots_processing} processing`],
      ["queued", `${health.queued.generate} generate · ${health.queued.embed} embed`]);
  }
  if (health.reason) rows.push(["reason", health.reason]);
  list.replaceChildren(...facts(rows));
  list.dataset.state = health.status;
}

async function showMetrics() {
  if (keyMissing()) return;
  clearBanner();
  try {
    const pre = $("metrics");
    pre.textContent = await (await api("/metrics")).text();
    pre.hidden = false;
  } catch (error) {
    showError(error);
  }
}

// ---- wiring

function start() {
  if (KEY_REQUIRED) $("api-key").placeholder = "required";
  loadKey();
  loadSettings();
  loadConversations();
  current ??= newConversation();
  if (!conversations.includes(current)) conversations.push(current);
  showConversation();

  showTab("chat");
  const tabs = [...document.querySelectorAll("nav button[data-tab]")];
  for (const button of tabs) button.addEventListener("click", () => showTab(button.dataset.tab));
  document.querySelector("nav.tabs").addEventListener("keydown", (event) => { // a tab list's arrow keys
    const step = { ArrowRight: 1, ArrowLeft: -1 }[event.key];
    const at = tabs.indexOf(document.activeElement);
    if (!step || at < 0) return;
    const next = tabs[(at + step + tabs.length) % tabs.length];
    showTab(next.dataset.tab);
    next.focus();
  });
  $("api-key").addEventListener("input", saveKey);
  $("api-key").addEventListener("change", loadModel);
  $("remember-key").addEventListener("change", saveKey);

  $("send").addEventListener("click", send);
  $("stop").addEventListener("click", () => streaming?.controller.abort());
  $("regenerate").addEventListener("click", regenerate);
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      send();
    }
  });
  $("new-chat").addEventListener("click", startConversation);
  $("export").addEventListener("click", exportConversations);
  $("import").addEventListener("change", (event) => {
    const [file] = event.target.files;
    event.target.value = "";
    if (file) importConversations(file);
  });
  $("mode").addEventListener("change", () => { // for the next message: those shown keep their own
    current.mode = $("mode").value;
    saveConversations();
    renderConversationList();
    showMode();
  });
  $("system-prompt").addEventListener("input", () => {
    current.system = $("system-prompt").value;
    saveConversations();
  });
  $("settings").addEventListener("input", saveSettings);
  $("settings").addEventListener("submit", (event) => event.preventDefault());
  $("reset-settings").addEventListener("click", () => {
    $("settings").reset();
    saveSettings();
  });

  $("embed-run").addEventListener("click", compareEmbeddings);
  $("tokenize-run").addEventListener("click", tokenize);
  for (const [input, run] of [["embed-input", compareEmbeddings], ["tokenize-input", tokenize]]) {
    $(input).addEventListener("keydown", (event) => {
      if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) run();
    });
  }
  $("show-ids").addEventListener("change", () => $("tokens").classList.toggle("show-ids", $("show-ids").checked));
  $("metrics-show").addEventListener("click", showMetrics);

  loadModel();
}

start();
