// The chat page of vlm-serve: attach images, ask, watch the answer stream in.
//
// It speaks OpenAI's chat-completions API of the same origin: GET /v1/models fills the model
// picker; POST /v1/chat/completions with `stream: true` is read as server-sent events through the
// fetch body's ReadableStream, and an AbortController stops it (closing the connection is what
// tells the server to stop generating).
//
// Safety: model text only ever reaches the page through textContent / text nodes (renderText);
// no innerHTML anywhere, and the page's Content-Security-Policy forbids inline scripts anyway.

export const MAX_IMAGE_BYTES = 5 * 1024 * 1024; // the server's default images.max_image_bytes
export const MAX_IMAGES_PER_TURN = 8;
const TYPES = { "image/jpeg": "JPG", "image/png": "PNG", "image/webp": "WebP", "image/gif": "GIF" };
const EXTENSIONS = { jpg: "image/jpeg", jpeg: "image/jpeg", png: "image/png", webp: "image/webp", gif: "image/gif" };
const STORE = "vlm-serve.";

// ---- small helpers ---------------------------------------------------------------------------

const $ = (id) => document.getElementById(id);

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (key in node && typeof value !== "string") node[key] = value;
    else node.setAttribute(key, value === true ? "" : value);
  }
  node.append(...children.filter((c) => c !== null && c !== undefined));
  return node;
}

export function formatBytes(bytes) {
  if (bytes < 1024) return `${bytes} B`;
  if (bytes < 1024 * 1024) return `${(bytes / 1024).toFixed(0)} KB`;
  return `${(bytes / (1024 * 1024)).toFixed(1)} MB`;
}

const store = {
  get(key, fallback = "") {
    try {
      const value = localStorage.getItem(STORE + key);
      return value === null ? fallback : value;
    } catch {
      return fallback;
    }
  },
  set(key, value) {
    try {
      if (value === "" || value === null || value === undefined) localStorage.removeItem(STORE + key);
      else localStorage.setItem(STORE + key, String(value));
    } catch {
      /* storage disabled: settings last for this page only */
    }
  },
};

// ---- rendering model text safely -------------------------------------------------------------

const FENCE = /^\s{0,3}(`{3,}|~{3,})\s*([^`\s]*)[^`]*$/;

/** Inline `code` spans of one text block, as text nodes and <code> elements. */
function inlineNodes(text) {
  const nodes = [];
  const re = /`([^`\n]+)`/g;
  let last = 0;
  for (let m; (m = re.exec(text)); ) {
    if (m.index > last) nodes.push(document.createTextNode(text.slice(last, m.index)));
    nodes.push(el("code", { class: "inline-code", text: m[1] }));
    last = m.index + m[0].length;
  }
  if (last < text.length) nodes.push(document.createTextNode(text.slice(last)));
  return nodes;
}

function codeBlock(code, lang) {
  const copy = el("button", { type: "button", class: "btn btn-ghost btn-small", text: "Copy code" });
  copy.addEventListener("click", () => copyWithFeedback(copy, code, "Copy code"));
  return el(
    "div",
    { class: "code-block" },
    el("div", { class: "code-head" }, el("span", { class: "code-lang", text: lang || "code" }), copy),
    el("pre", {}, el("code", { text: code })),
  );
}

/**
 * Model text as DOM: paragraphs keep their line breaks (CSS pre-wrap), ``` / ~~~ fenced blocks
 * become <pre><code>, `x` becomes <code>. Everything is text nodes: markup in `text` stays text.
 * An unterminated fence (an answer still streaming) renders as code up to the end.
 */
export function renderText(text) {
  const fragment = document.createDocumentFragment();
  const lines = String(text).split(/\r\n|\r|\n/);
  let prose = [];
  let code = null; // {fence, lang, lines}
  const flushProse = () => {
    const body = prose.join("\n").replace(/^\n+|\n+$/g, "");
    if (body) fragment.append(el("p", { class: "md-text" }, ...inlineNodes(body)));
    prose = [];
  };
  for (const line of lines) {
    const fence = FENCE.exec(line);
    if (code === null) {
      if (fence) {
        flushProse();
        code = { fence: fence[1], lang: fence[2], lines: [] };
      } else {
        prose.push(line);
      }
    } else if (fence && fence[1][0] === code.fence[0] && fence[1].length >= code.fence.length && !fence[2]) {
      fragment.append(codeBlock(code.lines.join("\n"), code.lang));
      code = null;
    } else {
      code.lines.push(line);
    }
  }
  if (code !== null) fragment.append(codeBlock(code.lines.join("\n"), code.lang));
  flushProse();
  return fragment;
}

// ---- server-sent events ----------------------------------------------------------------------

/** The `data` payloads of the server-sent events in a byte stream, one string per event. */
export async function* sseData(stream) {
  const reader = stream.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  let data = [];
  let finished = false;
  const line = function* (text) {
    if (text === "") {
      if (data.length) yield data.join("\n");
      data = [];
    } else if (text.startsWith("data:")) {
      data.push(text.slice(text[5] === " " ? 6 : 5));
    } // comments (":") and other fields (event, id, retry) are not used by OpenAI streams
  };
  try {
    for (;;) {
      const { value, done } = await reader.read();
      buffer += done ? decoder.decode() : decoder.decode(value, { stream: true });
      // Split into lines; a trailing "\r" may be half of a "\r\n", so it waits for the next read.
      const parts = buffer.split(/\r\n|\n|\r(?!$)/);
      buffer = done ? "" : parts.pop();
      for (const text of parts) yield* line(text);
      if (done) {
        if (buffer) yield* line(buffer);
        yield* line("");
        finished = true;
        return;
      }
    }
  } finally {
    if (!finished) reader.cancel().catch(() => {});
    reader.releaseLock();
  }
}

// ---- errors ----------------------------------------------------------------------------------

export class ApiError extends Error {
  constructor(message, { status = 0, type = "", code = "", retryAfter = null } = {}) {
    super(message);
    this.name = "ApiError";
    this.status = status;
    this.type = type;
    this.code = code;
    this.retryAfter = retryAfter; // seconds, for 429 and 503
  }
}

function retryAfterSeconds(header) {
  if (!header) return null;
  const seconds = Number(header);
  if (Number.isFinite(seconds)) return Math.max(0, Math.ceil(seconds));
  const date = Date.parse(header);
  return Number.isNaN(date) ? null : Math.max(0, Math.ceil((date - Date.now()) / 1000));
}

/** An ApiError from a non-2xx response, reading OpenAI's `{"error": {...}}` body when present. */
async function httpError(response) {
  let message = "";
  let type = "";
  let code = "";
  const body = await response.text().catch(() => "");
  try {
    const error = JSON.parse(body).error;
    if (typeof error === "string") message = error;
    else if (error) ({ message = "", type = "", code = "" } = error);
  } catch {
    message = body.slice(0, 500);
  }
  return new ApiError(message || response.statusText || "Request failed.", {
    status: response.status,
    type,
    code: code || "",
    retryAfter: retryAfterSeconds(response.headers.get("Retry-After")),
  });
}

const TITLES = {
  400: "The server refused the request",
  401: "Authentication failed",
  403: "Not allowed",
  404: "Not found",
  413: "Too large",
  422: "The server refused the request",
  429: "Too many requests",
  500: "Server error",
  503: "The server is busy",
};

function errorTitle(error) {
  if (!(error instanceof ApiError)) return "Could not reach the server";
  const title = TITLES[error.status] || (error.status ? "Request failed" : "The answer failed");
  return error.status ? `${title} (${error.status})` : title;
}

function errorHint(error) {
  if (!(error instanceof ApiError)) return "Check that the server is running, then send again.";
  switch (error.status) {
    case 401:
    case 403:
      return "Check the API key in Settings, then send again.";
    case 413:
      return "Send fewer or smaller images.";
    default:
      return "";
  }
}

// ---- the page --------------------------------------------------------------------------------

const ui = {};
const state = {
  history: [], // the committed conversation, as OpenAI messages
  attachments: [], // {id, name, size, type, dataUrl}
  controller: null, // the AbortController of the answer streaming now
  epoch: 0, // bumped by Clear, so a late-finishing request does not touch the new conversation
  nextId: 1,
  dragDepth: 0,
};

function showNotice(message) {
  ui.notice.textContent = message;
  ui.notice.hidden = !message;
}

function setBusy(busy) {
  document.body.dataset.state = busy ? "streaming" : "idle";
  ui.send.hidden = busy;
  ui.stop.hidden = !busy;
}

function updateEmpty() {
  ui.empty.hidden = ui.log.children.length > 0;
}

function scrollToEnd(force = false) {
  const s = ui.scroller;
  if (force || s.scrollHeight - s.scrollTop - s.clientHeight < 120) s.scrollTop = s.scrollHeight;
}

function autosize() {
  const t = ui.prompt;
  t.style.height = "auto";
  t.style.height = `${Math.min(t.scrollHeight, 200)}px`;
}

async function copyText(text) {
  try {
    await navigator.clipboard.writeText(text);
    return true;
  } catch {
    // Plain-http pages on another host are not a secure context: fall back to a selection.
    const area = el("textarea", { readonly: true, class: "offscreen" });
    area.value = text;
    document.body.append(area);
    area.select();
    let ok = false;
    try {
      ok = document.execCommand("copy");
    } catch {
      ok = false;
    }
    area.remove();
    return ok;
  }
}

async function copyWithFeedback(button, text, label) {
  const ok = await copyText(text);
  button.textContent = ok ? "Copied" : "Copy failed";
  setTimeout(() => {
    button.textContent = label;
  }, 1500);
}

// ---- attachments -----------------------------------------------------------------------------

function mimeOf(file) {
  if (TYPES[file.type]) return file.type;
  if (file.type) return null;
  const ext = (file.name.split(".").pop() || "").toLowerCase();
  return EXTENSIONS[ext] || null;
}

function readDataUrl(file, mime) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(String(reader.result).replace(/^data:[^;,]*/, `data:${mime}`));
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

/** Attach image files after checking their type and size; problems go to the notice line. */
export async function addFiles(files) {
  const problems = [];
  for (const file of Array.from(files || [])) {
    const name = file.name || "pasted image";
    const mime = mimeOf(file);
    if (!mime) {
      problems.push(`${name} is not a supported image type; use JPG, PNG, WebP or GIF.`);
      continue;
    }
    if (file.size > MAX_IMAGE_BYTES) {
      // Just over the limit rounds to the limit: then say the exact size.
      let size = formatBytes(file.size);
      if (size === formatBytes(MAX_IMAGE_BYTES)) size = `${file.size.toLocaleString("en")} bytes`;
      problems.push(
        `${name} is too large (${size}); the limit is ${MAX_IMAGE_BYTES / (1024 * 1024)} MB per image. ` +
          "It was not attached: shrink or crop it and try again.",
      );
      continue;
    }
    if (state.attachments.length >= MAX_IMAGES_PER_TURN) {
      problems.push(`At most ${MAX_IMAGES_PER_TURN} images per message; ${name} was not attached.`);
      continue;
    }
    try {
      const dataUrl = await readDataUrl(file, mime);
      state.attachments.push({ id: state.nextId++, name, size: file.size, type: mime, dataUrl });
    } catch {
      problems.push(`${name} could not be read.`);
    }
  }
  showNotice(problems.join(" "));
  renderAttachments();
}

function removeAttachment(id) {
  const index = state.attachments.findIndex((a) => a.id === id);
  if (index < 0) return;
  state.attachments.splice(index, 1);
  renderAttachments();
  const buttons = ui.attachments.querySelectorAll("button.remove");
  (buttons[Math.min(index, buttons.length - 1)] || ui.prompt).focus();
}

function renderAttachments() {
  ui.attachments.replaceChildren(
    ...state.attachments.map((a) => {
      const img = el("img", { src: a.dataUrl, alt: a.name, title: `${a.name} · ${formatBytes(a.size)}` });
      img.addEventListener("error", () => {
        state.attachments = state.attachments.filter((x) => x.id !== a.id);
        renderAttachments();
        showNotice(`${a.name} could not be shown as an image; it was removed.`);
      });
      return el(
        "li",
        { class: "attachment" },
        img,
        el("span", { class: "attachment-size", text: formatBytes(a.size), "aria-hidden": "true" }),
        el("button", {
          type: "button",
          class: "remove",
          "aria-label": `Remove image ${a.name}`,
          title: "Remove",
          text: "×",
          onclick: () => removeAttachment(a.id),
        }),
      );
    }),
  );
  ui.attachments.hidden = state.attachments.length === 0;
}

// ---- settings --------------------------------------------------------------------------------

function authHeaders() {
  const key = ui.apiKey.value.trim();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

let modelsRequest = 0;

async function loadModels() {
  const request = ++modelsRequest;
  ui.modelStatus.textContent = "Loading models…";
  ui.modelStatus.classList.remove("error");
  try {
    const response = await fetch("/v1/models", { headers: authHeaders() });
    if (!response.ok) throw await httpError(response);
    const models = (await response.json()).data || [];
    if (request !== modelsRequest) return;
    const saved = store.get("model");
    ui.model.replaceChildren(
      ...models.map((m, i) => el("option", { value: m.id, text: i === 0 ? m.id : `${m.id} (alias)` })),
    );
    if (models.some((m) => m.id === saved)) ui.model.value = saved;
    ui.modelInfo = Object.fromEntries(models.map((m) => [m.id, m]));
    describeModel();
  } catch (error) {
    if (request !== modelsRequest) return;
    const saved = store.get("model");
    if (!ui.model.options.length && saved) ui.model.append(el("option", { value: saved, text: saved }));
    ui.modelStatus.textContent = `Could not load the model list — ${errorTitle(error)}: ${error.message}`;
    ui.modelStatus.classList.add("error");
  }
}

function describeModel() {
  const info = (ui.modelInfo || {})[ui.model.value];
  if (!info) return;
  const parts = [];
  if (info.max_model_len) parts.push(`context ${info.max_model_len} tokens`);
  if (info.quantization && info.quantization !== "none") parts.push(info.quantization);
  ui.modelStatus.textContent = parts.join(" · ");
}

function setSettingsOpen(open) {
  ui.settings.hidden = !open;
  ui.settingsToggle.setAttribute("aria-expanded", String(open));
  document.body.classList.toggle("settings-open", open);
}

function readSettings() {
  const raw = ui.maxTokens.value.trim();
  let maxTokens = null;
  if (raw !== "") {
    maxTokens = Number(raw);
    if (!Number.isInteger(maxTokens) || maxTokens < 1) {
      throw new Error("Max tokens must be a whole number of at least 1 (or empty for the server's default).");
    }
  }
  return {
    model: ui.model.value || store.get("model"),
    maxTokens,
    temperature: Number(ui.temperature.value),
    ignoreEos: ui.ignoreEos.checked,
    systemPrompt: ui.systemPrompt.value.trim(),
  };
}

function initSettings() {
  ui.apiKey.value = store.get("apiKey");
  ui.maxTokens.value = store.get("maxTokens");
  ui.temperature.value = store.get("temperature", "1");
  ui.ignoreEos.checked = store.get("ignoreEos") === "1";
  ui.systemPrompt.value = store.get("systemPrompt");
  const showTemperature = () => {
    ui.temperatureValue.textContent = Number(ui.temperature.value).toFixed(2);
  };
  showTemperature();

  let keyTimer = null;
  const keyChanged = () => {
    clearTimeout(keyTimer);
    store.set("apiKey", ui.apiKey.value.trim());
    loadModels();
  };
  ui.apiKey.addEventListener("input", () => {
    clearTimeout(keyTimer);
    keyTimer = setTimeout(keyChanged, 700);
  });
  ui.apiKey.addEventListener("change", keyChanged);
  ui.apiKeyShow.addEventListener("click", () => {
    const show = ui.apiKey.type === "password";
    ui.apiKey.type = show ? "text" : "password";
    ui.apiKeyShow.textContent = show ? "Hide" : "Show";
    ui.apiKeyShow.setAttribute("aria-pressed", String(show));
  });
  ui.model.addEventListener("change", () => {
    store.set("model", ui.model.value);
    describeModel();
  });
  ui.maxTokens.addEventListener("change", () => store.set("maxTokens", ui.maxTokens.value.trim()));
  ui.temperature.addEventListener("input", () => {
    showTemperature();
    store.set("temperature", ui.temperature.value);
  });
  ui.ignoreEos.addEventListener("change", () => store.set("ignoreEos", ui.ignoreEos.checked ? "1" : ""));
  ui.systemPrompt.addEventListener("change", () => store.set("systemPrompt", ui.systemPrompt.value.trim()));

  const wide = window.matchMedia("(min-width: 900px)");
  setSettingsOpen(wide.matches);
  wide.addEventListener("change", (e) => setSettingsOpen(e.matches));
  ui.settingsToggle.addEventListener("click", () => setSettingsOpen(ui.settings.hidden));
}

// ---- sample images ---------------------------------------------------------------------------

/** Offer static/samples/index.json's images, when a generator has put some there. */
async function loadSamples() {
  let list;
  try {
    const response = await fetch("/static/samples/index.json", { cache: "no-cache" });
    if (!response.ok) return;
    const index = await response.json();
    list = Array.isArray(index) ? index : Array.isArray(index?.samples) ? index.samples : [];
  } catch {
    return; // no samples (yet): the spot stays hidden
  }
  const base = new URL("/static/samples/", window.location.href);
  const items = [];
  for (const sample of list.slice(0, 24)) {
    const entry = typeof sample === "string" ? { file: sample } : sample || {};
    const src = entry.url || entry.file || entry.image;
    if (typeof src !== "string" || !src) continue;
    const url = new URL(src, base);
    if (url.origin !== window.location.origin) continue;
    const title = String(entry.title || entry.label || url.pathname.split("/").pop());
    const prompt = typeof (entry.prompt ?? entry.question) === "string" ? entry.prompt ?? entry.question : "";
    const button = el(
      "button",
      { type: "button", class: "sample", title: prompt ? `${title} — “${prompt}”` : title },
      el("img", { src: url.href, alt: "", loading: "lazy" }),
      el("span", { class: "sample-title", text: title }),
    );
    button.setAttribute("aria-label", `Attach sample image: ${title}${prompt ? `, and ask: ${prompt}` : ""}`);
    button.addEventListener("click", () => useSample(url.href, title, prompt));
    items.push(el("li", {}, button));
  }
  if (items.length) {
    ui.sampleList.replaceChildren(...items);
    ui.samples.hidden = false;
  }
}

async function useSample(href, title, prompt) {
  try {
    const response = await fetch(href);
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    const blob = await response.blob();
    const name = href.split("/").pop() || title;
    await addFiles([new File([blob], name, { type: blob.type })]);
    if (prompt && !ui.prompt.value.trim()) {
      ui.prompt.value = prompt;
      autosize();
    }
    ui.prompt.focus();
  } catch (error) {
    showNotice(`Could not load the sample image ${title}: ${error.message}`);
  }
}

// ---- conversation ----------------------------------------------------------------------------

function userTurn(text, images) {
  const node = el("li", { class: "turn user" });
  const bubble = el("div", { class: "bubble" });
  if (images.length) {
    bubble.append(
      el(
        "div",
        { class: "turn-images" },
        ...images.map((a) => el("img", { src: a.dataUrl, alt: `Attached image: ${a.name}`, title: a.name })),
      ),
    );
  }
  if (text) bubble.append(el("p", { class: "md-text", text }));
  node.append(el("h3", { class: "visually-hidden", text: "You" }), bubble);
  return node;
}

function assistantTurn() {
  const body = el("div", { class: "answer-body" }, el("span", { class: "typing", text: "Thinking…" }));
  const stats = el("span", { class: "answer-stats" });
  const copy = el("button", { type: "button", class: "btn btn-ghost btn-small copy", text: "Copy", disabled: true });
  copy.setAttribute("aria-label", "Copy answer");
  const meta = el("div", { class: "answer-meta" }, stats, copy);
  const node = el("li", { class: "turn assistant", "aria-busy": "true" });
  node.append(el("h3", { class: "visually-hidden", text: "Assistant" }), el("div", { class: "bubble" }, body, meta));
  return { node, body, stats, copy, meta };
}

function errorBox(error) {
  const box = el("div", { class: "turn-error", role: "alert" });
  box.append(el("strong", { text: `${errorTitle(error)}: ` }), document.createTextNode(error.message || ""));
  const hint = errorHint(error);
  if (hint) box.append(" ", el("span", { class: "hint-inline", text: hint }));
  if (error instanceof ApiError && error.retryAfter !== null && [429, 503].includes(error.status)) {
    const retry = el("span", { class: "retry", role: "timer" });
    let left = error.retryAfter;
    const tick = () => {
      retry.textContent = left > 0 ? `You can retry in ${left} s.` : "You can retry now.";
      if (left > 0) {
        left -= 1;
        setTimeout(() => retry.isConnected && tick(), 1000);
      }
    };
    tick();
    box.append(retry);
  }
  if (error instanceof ApiError && [401, 403].includes(error.status)) {
    box.append(
      " ",
      el("button", {
        type: "button",
        class: "btn btn-ghost btn-small",
        text: "Open settings",
        onclick: () => {
          setSettingsOpen(true);
          ui.apiKey.focus();
        },
      }),
    );
  }
  return box;
}

function statsText({ ttft, tokensPerSecond, usage, tokens, finish, stopped }) {
  const parts = [];
  if (ttft !== null) parts.push(`first token ${Math.round(ttft)} ms`);
  if (tokensPerSecond !== null) parts.push(`${tokensPerSecond.toFixed(1)} tokens/s`);
  if (usage) {
    parts.push(`${usage.prompt_tokens} prompt + ${usage.completion_tokens} completion = ${usage.total_tokens} tokens`);
  } else if (tokens) {
    parts.push(`~${tokens} tokens received`);
  }
  if (stopped) parts.push("stopped");
  else if (finish === "length") parts.push("cut at max tokens");
  return parts.join(" · ");
}

/** Put a failed or empty turn's text and images back into the composer, if it is empty. */
function restoreDraft(text, images) {
  if (ui.prompt.value.trim() || state.attachments.length) return;
  ui.prompt.value = text;
  state.attachments = images.slice();
  renderAttachments();
  autosize();
}

async function send() {
  if (state.controller) return;
  const text = ui.prompt.value.trim();
  const images = state.attachments.slice();
  if (!text && !images.length) {
    showNotice("Type a question or attach an image first.");
    ui.prompt.focus();
    return;
  }
  let settings;
  try {
    settings = readSettings();
  } catch (error) {
    showNotice(error.message);
    setSettingsOpen(true);
    ui.maxTokens.focus();
    return;
  }
  showNotice("");

  const content = images.map((a) => ({ type: "image_url", image_url: { url: a.dataUrl } }));
  if (text) content.push({ type: "text", text });
  const userMessage = { role: "user", content };
  const system = settings.systemPrompt ? [{ role: "system", content: settings.systemPrompt }] : [];
  const body = {
    model: settings.model,
    messages: [...system, ...state.history, userMessage],
    stream: true,
    stream_options: { include_usage: true },
    temperature: settings.temperature,
  };
  if (settings.maxTokens !== null) body.max_tokens = settings.maxTokens;
  if (settings.ignoreEos) body.ignore_eos = true;

  const userNode = userTurn(text, images);
  const answer = assistantTurn();
  ui.log.append(userNode, answer.node);
  updateEmpty();
  ui.prompt.value = "";
  state.attachments = [];
  renderAttachments();
  autosize();
  scrollToEnd(true);

  const epoch = state.epoch;
  const controller = new AbortController();
  state.controller = controller;
  setBusy(true);

  const started = performance.now();
  let firstAt = null;
  let lastAt = null;
  let textSoFar = "";
  let usage = null;
  let finish = null;
  let pieces = 0;
  let renderPending = false;
  const render = () => {
    renderPending = false;
    answer.body.replaceChildren(renderText(textSoFar));
    scrollToEnd();
  };
  const stats = (stopped) => {
    const tokens = usage ? usage.completion_tokens : pieces;
    const span = firstAt !== null && lastAt !== null ? (lastAt - firstAt) / 1000 : 0;
    // Decode speed: the tokens after the first over the time from the first to the last. When they
    // arrived in one burst (too short to time), the rate over the whole request instead.
    let tokensPerSecond = null;
    if (tokens > 2 && span >= 0.05) tokensPerSecond = (tokens - 1) / span;
    else if (tokens > 0 && lastAt !== null && lastAt > started) tokensPerSecond = tokens / ((lastAt - started) / 1000);
    return statsText({ ttft: firstAt === null ? null : firstAt - started, tokensPerSecond, usage, tokens, finish, stopped });
  };

  let outcome = "done";
  let failure = null;
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json", Accept: "text/event-stream", ...authHeaders() },
      body: JSON.stringify(body),
      signal: controller.signal,
    });
    if (!response.ok) throw await httpError(response);
    if (!response.body) throw new ApiError("The server sent no body.");
    for await (const data of sseData(response.body)) {
      if (data === "[DONE]") break;
      let chunk;
      try {
        chunk = JSON.parse(data);
      } catch {
        continue;
      }
      if (chunk.error) {
        const e = chunk.error;
        throw new ApiError(e.message || "The answer failed.", { type: e.type, code: e.code });
      }
      if (chunk.usage) usage = chunk.usage;
      const choice = (chunk.choices || [])[0];
      if (!choice) continue;
      const piece = choice.delta && choice.delta.content;
      if (piece) {
        const now = performance.now();
        if (firstAt === null) firstAt = now;
        lastAt = now;
        pieces += 1;
        textSoFar += piece;
        if (!renderPending) {
          renderPending = true;
          requestAnimationFrame(render);
        }
      }
      if (choice.finish_reason) finish = choice.finish_reason;
    }
  } catch (error) {
    if (error && error.name === "AbortError") outcome = "stopped";
    else {
      outcome = "error";
      failure = error instanceof ApiError ? error : new Error(String((error && error.message) || error));
    }
  } finally {
    if (state.controller === controller) state.controller = null;
    setBusy(false);
  }
  if (epoch !== state.epoch) return; // Clear was pressed meanwhile

  answer.node.removeAttribute("aria-busy");
  if (textSoFar) render();
  else answer.body.replaceChildren();
  const keep = outcome === "done" || (outcome === "stopped" && textSoFar);
  if (keep) {
    state.history.push(userMessage, { role: "assistant", content: textSoFar });
    answer.stats.textContent = stats(outcome === "stopped");
    answer.copy.disabled = false;
    answer.copy.addEventListener("click", () => copyWithFeedback(answer.copy, textSoFar, "Copy"));
    if (outcome === "done" && !textSoFar) answer.body.append(el("p", { class: "muted", text: "(empty answer)" }));
  } else {
    // Not part of the conversation: say so, and give the message back to edit or resend.
    userNode.classList.add("failed");
    answer.meta.remove();
    if (outcome === "error") answer.body.append(errorBox(failure));
    else answer.body.append(el("p", { class: "muted", text: "Stopped before the first token." }));
    answer.body.append(el("p", { class: "muted small", text: "This message was not kept; it is back in the message box." }));
    restoreDraft(text, images);
  }
  answer.node.classList.add(`outcome-${outcome}`);
  scrollToEnd();
}

function stop() {
  if (state.controller) state.controller.abort();
}

function clearConversation() {
  state.epoch += 1;
  stop();
  state.history = [];
  state.attachments = [];
  ui.log.replaceChildren();
  ui.prompt.value = "";
  renderAttachments();
  showNotice("");
  autosize();
  updateEmpty();
  ui.prompt.focus();
}

// ---- wiring ----------------------------------------------------------------------------------

function hasFiles(event) {
  return Array.from((event.dataTransfer && event.dataTransfer.types) || []).includes("Files");
}

function init() {
  for (const [key, id] of Object.entries({
    log: "log", empty: "empty", scroller: "scroller", composer: "composer", prompt: "prompt",
    send: "send", stop: "stop", clear: "clear", fileInput: "file-input", attachments: "attachments",
    notice: "notice", model: "model", modelStatus: "model-status", apiKey: "api-key",
    apiKeyShow: "api-key-show", maxTokens: "max-tokens", temperature: "temperature",
    temperatureValue: "temperature-value", ignoreEos: "ignore-eos", systemPrompt: "system-prompt",
    settings: "settings", settingsToggle: "settings-toggle", samples: "samples",
    sampleList: "sample-list", dropOverlay: "drop-overlay",
  })) {
    ui[key] = $(id);
  }

  $("settings-form").addEventListener("submit", (e) => e.preventDefault());
  ui.composer.addEventListener("submit", (e) => {
    e.preventDefault();
    send();
  });
  ui.prompt.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing && e.keyCode !== 229) {
      e.preventDefault();
      send();
    }
  });
  ui.prompt.addEventListener("input", autosize);
  ui.stop.addEventListener("click", () => {
    stop();
    ui.prompt.focus();
  });
  ui.clear.addEventListener("click", clearConversation);
  document.addEventListener("keydown", (e) => {
    if (e.key !== "Escape") return;
    if (state.controller) stop();
    else if (!window.matchMedia("(min-width: 900px)").matches && !ui.settings.hidden) {
      setSettingsOpen(false);
      ui.settingsToggle.focus();
    }
  });

  ui.fileInput.addEventListener("change", async () => {
    await addFiles(ui.fileInput.files);
    ui.fileInput.value = "";
    ui.prompt.focus();
  });
  document.addEventListener("paste", (e) => {
    const files = Array.from((e.clipboardData && e.clipboardData.files) || []);
    if (!files.length) return;
    if (!e.clipboardData.types.includes("text/plain")) e.preventDefault();
    addFiles(files);
  });

  // Drop anywhere on the page.
  document.addEventListener("dragenter", (e) => {
    if (!hasFiles(e)) return;
    e.preventDefault();
    state.dragDepth += 1;
    ui.dropOverlay.hidden = false;
  });
  document.addEventListener("dragover", (e) => {
    if (!hasFiles(e)) return;
    e.preventDefault();
    e.dataTransfer.dropEffect = "copy";
  });
  document.addEventListener("dragleave", () => {
    state.dragDepth = Math.max(0, state.dragDepth - 1);
    if (state.dragDepth === 0) ui.dropOverlay.hidden = true;
  });
  document.addEventListener("drop", (e) => {
    state.dragDepth = 0;
    ui.dropOverlay.hidden = true;
    if (!e.dataTransfer || !e.dataTransfer.files.length) return;
    e.preventDefault();
    addFiles(e.dataTransfer.files);
    ui.prompt.focus();
  });

  initSettings();
  setBusy(false);
  renderAttachments();
  updateEmpty();
  loadModels();
  loadSamples();
  document.body.dataset.ready = "true";
}

if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init);
else init();
