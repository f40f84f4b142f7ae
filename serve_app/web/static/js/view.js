// The page's elements, found once, and the small pieces of page state every module may change:
// the notice line, busy/idle, the empty-state card, scrolling, the message box's height and the
// settings panel.

import { $ } from "./dom.js";

const IDS = {
  log: "log", empty: "empty", scroller: "scroller", composer: "composer", prompt: "prompt",
  send: "send", stop: "stop", clear: "clear", fileInput: "file-input", attachments: "attachments",
  notice: "notice", settingsForm: "settings-form", model: "model", modelStatus: "model-status",
  apiKey: "api-key", apiKeyShow: "api-key-show", maxTokens: "max-tokens", temperature: "temperature",
  temperatureValue: "temperature-value", topP: "top-p", topPValue: "top-p-value",
  samplingReset: "sampling-reset", ignoreEos: "ignore-eos", systemPrompt: "system-prompt",
  settings: "settings", settingsToggle: "settings-toggle", samples: "samples",
  sampleList: "sample-list", dropOverlay: "drop-overlay",
};

/** The page's elements by role; filled by bindElements() before anything else runs. */
export const ui = {};

export function bindElements() {
  for (const [key, id] of Object.entries(IDS)) {
    ui[key] = $(id);
    if (!ui[key]) throw new Error(`The page has no #${id}.`);
  }
}

/** The settings panel is a side column on wide screens and an overlay on narrow ones. */
export const wideScreen = () => window.matchMedia("(min-width: 900px)");

export function showNotice(message) {
  ui.notice.textContent = message;
  ui.notice.hidden = !message;
}

export function setBusy(busy) {
  document.body.dataset.state = busy ? "streaming" : "idle";
  ui.send.hidden = busy;
  ui.stop.hidden = !busy;
}

export function updateEmpty() {
  ui.empty.hidden = ui.log.children.length > 0;
}

/** Follow the newest text, unless the reader has scrolled up to read (or `force`). */
export function scrollToEnd(force = false) {
  const s = ui.scroller;
  if (force || s.scrollHeight - s.scrollTop - s.clientHeight < 120) s.scrollTop = s.scrollHeight;
}

/** Grow the message box with its text, up to a limit. */
export function autosize() {
  const t = ui.prompt;
  t.style.height = "auto";
  t.style.height = `${Math.min(t.scrollHeight, 200)}px`;
}

export function setSettingsOpen(open) {
  ui.settings.hidden = !open;
  ui.settingsToggle.setAttribute("aria-expanded", String(open));
  document.body.classList.toggle("settings-open", open);
}
