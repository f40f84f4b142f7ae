// The settings panel: the model picker (filled from GET /v1/models, with the model's context size
// and quantization shown under it), the API key, the sampling controls, ignore_eos and the system
// prompt. Everything but the key's visibility is kept in this browser.

import { listModels } from "./api.js";
import { el } from "./dom.js";
import { errorTitle } from "./errors.js";
import { initSampling, samplingFields, useModelDefaults } from "./sampling.js";
import { store } from "./store.js";
import { setSettingsOpen, ui, wideScreen } from "./view.js";

let models = {}; // id -> the served model object
let modelsRequest = 0; // only the latest request's answer is used (the key may change meanwhile)

export const apiKey = () => ui.apiKey.value.trim();

export async function loadModels() {
  const request = ++modelsRequest;
  ui.modelStatus.textContent = "Loading models…";
  ui.modelStatus.classList.remove("error");
  try {
    const served = await listModels(apiKey());
    if (request !== modelsRequest) return;
    const saved = store.get("model");
    ui.model.replaceChildren(
      ...served.map((m, i) => el("option", { value: m.id, text: i === 0 ? m.id : `${m.id} (alias)` })),
    );
    if (served.some((m) => m.id === saved)) ui.model.value = saved;
    models = Object.fromEntries(served.map((m) => [m.id, m]));
    modelChanged();
  } catch (error) {
    if (request !== modelsRequest) return;
    const saved = store.get("model");
    if (!ui.model.options.length && saved) ui.model.append(el("option", { value: saved, text: saved }));
    ui.modelStatus.textContent = `Could not load the model list — ${errorTitle(error)}: ${error.message}`;
    ui.modelStatus.classList.add("error");
  }
}

function modelChanged() {
  const info = models[ui.model.value];
  useModelDefaults(info && info.generation_defaults);
  if (!info) return;
  const parts = [];
  if (info.max_model_len) parts.push(`context ${info.max_model_len} tokens`);
  if (info.quantization && info.quantization !== "none") parts.push(info.quantization);
  ui.modelStatus.textContent = parts.join(" · ");
}

/** What the next request is sent with. Throws an Error (with the control in `input`) on a bad value. */
export function readSettings() {
  return {
    model: ui.model.value || store.get("model"),
    sampling: samplingFields(),
    ignoreEos: ui.ignoreEos.checked,
    systemPrompt: ui.systemPrompt.value.trim(),
  };
}

export function initSettings() {
  ui.settingsForm.addEventListener("submit", (e) => e.preventDefault());
  ui.apiKey.value = store.get("apiKey");
  ui.ignoreEos.checked = store.get("ignoreEos") === "1";
  ui.systemPrompt.value = store.get("systemPrompt");
  initSampling();

  // A changed key reloads the model list (which may need the key), after typing pauses.
  let keyTimer = null;
  const keyChanged = () => {
    clearTimeout(keyTimer);
    store.set("apiKey", apiKey());
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
    modelChanged();
  });
  ui.ignoreEos.addEventListener("change", () => store.set("ignoreEos", ui.ignoreEos.checked ? "1" : ""));
  ui.systemPrompt.addEventListener("change", () => store.set("systemPrompt", ui.systemPrompt.value.trim()));

  const wide = wideScreen();
  setSettingsOpen(wide.matches);
  wide.addEventListener("change", (e) => setSettingsOpen(e.matches));
  ui.settingsToggle.addEventListener("click", () => setSettingsOpen(ui.settings.hidden));
}
