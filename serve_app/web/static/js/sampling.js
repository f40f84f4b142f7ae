// The sampling controls (max tokens, temperature, top_p). Each starts from the selected model's
// `generation_defaults` (an extension field of its GET /v1/models object) and follows the model
// when another is picked, until the user changes it. Only a changed control goes into a request:
// an untouched one is left out, so the server applies its own default, which is the same value
// when the model gave one and the server's fallback when it gave none. A changed value is kept in
// this browser until "Use the model's defaults" forgets it.

import { store } from "./store.js";
import { ui } from "./view.js";

const SERVER_DEFAULT = "server default";

const wholeNumber = (raw) => {
  const value = Number(raw);
  if (!Number.isInteger(value) || value < 1) {
    throw new Error("Max tokens must be a whole number of at least 1 (or empty for the server's default).");
  }
  return value;
};

// field: the request field and the generation_defaults key; input/output: keys of `ui`.
const CONTROLS = [
  { field: "max_tokens", input: "maxTokens", parse: wholeNumber },
  { field: "temperature", input: "temperature", output: "temperatureValue", parse: Number },
  { field: "top_p", input: "topP", output: "topPValue", parse: Number },
];

const chosen = new Map(); // field -> the raw value the user set ("" for a cleared number box)
let defaults = {};

const storeKey = (control) => `sampling.${control.field}`;

function modelDefault(control) {
  const value = defaults[control.field];
  return typeof value === "number" && Number.isFinite(value) ? value : null;
}

/** Show `control`'s value: the user's, else the model's default, else that the server decides. */
function show(control) {
  const input = ui[control.input];
  const own = chosen.has(control.field);
  const fallback = modelDefault(control);
  const value = own ? chosen.get(control.field) : fallback === null ? "" : String(fallback);
  if (input.value !== value) input.value = value; // unchanged while typing, so the caret stays
  // A range always has a position; without a default to show it is dimmed and its label says so.
  const known = own || fallback !== null;
  input.classList.toggle("unset", !known);
  if (control.output) {
    // The model's own number, not the slider's position, which snaps to the slider's step.
    ui[control.output].textContent = !known ? SERVER_DEFAULT : Number(own ? input.value : fallback).toFixed(2);
  }
  input.dataset.source = own ? "user" : fallback === null ? "server" : "model";
}

function showAll() {
  for (const control of CONTROLS) show(control);
  ui.samplingReset.hidden = chosen.size === 0;
}

/** Start untouched controls from `generationDefaults` (the model's; missing or null: none known). */
export function useModelDefaults(generationDefaults) {
  defaults = generationDefaults && typeof generationDefaults === "object" ? generationDefaults : {};
  showAll();
}

/**
 * The sampling fields of the next request: only those the user changed. A bad value throws an
 * Error whose `input` is the control to fix.
 */
export function samplingFields() {
  const fields = {};
  for (const control of CONTROLS) {
    const raw = (chosen.get(control.field) ?? "").trim();
    if (raw === "") continue;
    try {
      fields[control.field] = control.parse(raw);
    } catch (error) {
      error.input = ui[control.input];
      throw error;
    }
  }
  return fields;
}

export function initSampling() {
  for (const control of CONTROLS) {
    const saved = store.get(storeKey(control), null);
    if (saved !== null) chosen.set(control.field, saved);
    ui[control.input].addEventListener("input", () => {
      const raw = ui[control.input].value;
      chosen.set(control.field, raw);
      store.set(storeKey(control), raw.trim());
      show(control);
      ui.samplingReset.hidden = false;
    });
  }
  ui.samplingReset.addEventListener("click", () => {
    for (const control of CONTROLS) store.set(storeKey(control), "");
    chosen.clear();
    showAll();
  });
  showAll();
}
