// Sample images: when static/samples/index.json exists, its images are offered as one-click
// attachments, each with the question to ask about it. Its shape is described in
// serve_app/web/router.py; only same-origin images are offered.

import { addFiles } from "./attachments.js";
import { el } from "./dom.js";
import { autosize, showNotice, ui } from "./view.js";

const MAX_SAMPLES = 24;

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

function sampleButton(url, title, prompt) {
  const button = el(
    "button",
    { type: "button", class: "sample", title: prompt ? `${title} — “${prompt}”` : title },
    el("img", { src: url.href, alt: "", loading: "lazy" }),
    el("span", { class: "sample-title", text: title }),
  );
  button.setAttribute("aria-label", `Attach sample image: ${title}${prompt ? `, and ask: ${prompt}` : ""}`);
  button.addEventListener("click", () => useSample(url.href, title, prompt));
  return button;
}

/** Offer static/samples/index.json's images; without that file the spot stays hidden. */
export async function loadSamples() {
  let list;
  try {
    const response = await fetch("/static/samples/index.json", { cache: "no-cache" });
    if (!response.ok) return;
    const index = await response.json();
    list = Array.isArray(index) ? index : Array.isArray(index?.samples) ? index.samples : [];
  } catch {
    return;
  }
  const base = new URL("/static/samples/", window.location.href);
  const items = [];
  for (const sample of list.slice(0, MAX_SAMPLES)) {
    const entry = typeof sample === "string" ? { file: sample } : sample || {};
    const src = entry.url || entry.file || entry.image;
    if (typeof src !== "string" || !src) continue;
    const url = new URL(src, base);
    if (url.origin !== window.location.origin) continue;
    const title = String(entry.title || entry.label || url.pathname.split("/").pop());
    const prompt = typeof (entry.prompt ?? entry.question) === "string" ? entry.prompt ?? entry.question : "";
    items.push(el("li", {}, sampleButton(url, title, prompt)));
  }
  if (items.length) {
    ui.sampleList.replaceChildren(...items);
    ui.samples.hidden = false;
  }
}
