// The chat page of vlm-serve: attach images, ask, watch the answer stream in. This entry module
// wires the page's controls to the modules beside it, each with one job:
//   api.js          the OpenAI client: GET /v1/models, streaming chat completions (SSE)
//   conversation.js the history, sending a turn, stop and clear
//   attachments.js  images picked, pasted or dropped: type and size checks, previews
//   render.js       model text as safe DOM (text nodes only), code blocks
//   turns.js        the DOM of a user turn and an assistant turn
//   errors.js       how a failed request is shown
//   metrics.js      the figures under an answer
//   settings.js     the settings panel and the model list
//   sampling.js     the sampling controls, from the model's generation defaults
//   samples.js      the sample images
//   view.js, dom.js, store.js   the page's elements and state, DOM helpers, browser storage
//
// Safety: model text only ever reaches the page as text nodes (render.js); nothing uses innerHTML,
// and the page's Content-Security-Policy forbids inline scripts anyway.

import { renderAttachments, wireAttachmentInputs } from "./attachments.js";
import { clearConversation, isStreaming, send, stop } from "./conversation.js";
import { loadSamples } from "./samples.js";
import { initSettings, loadModels } from "./settings.js";
import { autosize, bindElements, setBusy, setSettingsOpen, ui, updateEmpty, wideScreen } from "./view.js";

function wireComposer() {
  ui.composer.addEventListener("submit", (e) => {
    e.preventDefault();
    send();
  });
  ui.prompt.addEventListener("keydown", (e) => {
    // Enter sends; Shift+Enter is a new line; Enter that confirms an IME composition is neither.
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
  // Escape stops an answer; otherwise it closes the settings overlay on a narrow screen.
  document.addEventListener("keydown", (e) => {
    if (e.key !== "Escape") return;
    if (isStreaming()) stop();
    else if (!wideScreen().matches && !ui.settings.hidden) {
      setSettingsOpen(false);
      ui.settingsToggle.focus();
    }
  });
}

function init() {
  bindElements();
  wireComposer();
  wireAttachmentInputs();
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
