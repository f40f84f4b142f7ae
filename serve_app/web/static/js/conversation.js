// The conversation: its committed history (OpenAI messages), sending the next turn and streaming
// its answer into the log, stopping it, and clearing everything.
//
// A turn joins the history only when its answer is complete, or was stopped after some text; a
// failed or empty turn is marked as not kept and its text and images go back to the composer.

import { ApiError, streamChat } from "./api.js";
import { attachmentCount, restoreAttachments, takeAttachments } from "./attachments.js";
import { copyWithFeedback, el } from "./dom.js";
import { errorBox } from "./errors.js";
import { AnswerMetrics } from "./metrics.js";
import { renderText } from "./render.js";
import { apiKey, readSettings } from "./settings.js";
import { assistantTurn, userTurn } from "./turns.js";
import { autosize, scrollToEnd, setBusy, setSettingsOpen, showNotice, ui, updateEmpty } from "./view.js";

let history = [];
let controller = null; // the AbortController of the answer streaming now
let epoch = 0; // bumped by Clear, so a late-finishing request does not touch the new conversation

export const isStreaming = () => controller !== null;

function openKeySettings() {
  setSettingsOpen(true);
  ui.apiKey.focus();
}

/** Put a failed or empty turn's text and images back into the composer, if it is empty. */
function restoreDraft(text, images) {
  if (ui.prompt.value.trim() || attachmentCount()) return;
  ui.prompt.value = text;
  restoreAttachments(images);
  autosize();
}

function requestBody(settings, userMessage) {
  const system = settings.systemPrompt ? [{ role: "system", content: settings.systemPrompt }] : [];
  const body = {
    model: settings.model,
    messages: [...system, ...history, userMessage],
    stream: true,
    stream_options: { include_usage: true },
    ...settings.sampling,
  };
  if (settings.ignoreEos) body.ignore_eos = true;
  return body;
}

export async function send() {
  if (controller) return;
  const text = ui.prompt.value.trim();
  if (!text && !attachmentCount()) {
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
    (error.input || ui.prompt).focus();
    return;
  }
  showNotice("");

  const images = takeAttachments();
  const content = images.map((a) => ({ type: "image_url", image_url: { url: a.dataUrl } }));
  if (text) content.push({ type: "text", text });
  const userMessage = { role: "user", content };
  const body = requestBody(settings, userMessage);

  const userNode = userTurn(text, images);
  const answer = assistantTurn();
  ui.log.append(userNode, answer.node);
  updateEmpty();
  ui.prompt.value = "";
  autosize();
  scrollToEnd(true);

  const sentIn = epoch;
  const mine = new AbortController();
  controller = mine;
  setBusy(true);

  const metrics = new AnswerMetrics();
  let textSoFar = "";
  let usage = null;
  let finish = null;
  let renderPending = false;
  const render = () => {
    renderPending = false;
    answer.body.replaceChildren(renderText(textSoFar));
    scrollToEnd();
  };

  let outcome = "done";
  let failure = null;
  try {
    for await (const chunk of streamChat(body, { apiKey: apiKey(), signal: mine.signal })) {
      if (chunk.usage) usage = chunk.usage;
      const choice = (chunk.choices || [])[0];
      if (!choice) continue;
      const piece = choice.delta && choice.delta.content;
      if (piece) {
        metrics.piece();
        textSoFar += piece;
        if (!renderPending) {
          renderPending = true;
          requestAnimationFrame(render); // one redraw per frame however fast pieces arrive
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
    if (controller === mine) controller = null;
    setBusy(false);
  }
  if (sentIn !== epoch) return; // Clear was pressed meanwhile

  answer.node.removeAttribute("aria-busy");
  if (textSoFar) render();
  else answer.body.replaceChildren();
  const keep = outcome === "done" || (outcome === "stopped" && textSoFar);
  if (keep) {
    history.push(userMessage, { role: "assistant", content: textSoFar });
    answer.stats.textContent = metrics.summary({ usage, finish, stopped: outcome === "stopped" });
    answer.copy.disabled = false;
    answer.copy.addEventListener("click", () => copyWithFeedback(answer.copy, textSoFar, "Copy"));
    if (outcome === "done" && !textSoFar) answer.body.append(el("p", { class: "muted", text: "(empty answer)" }));
  } else {
    // Not part of the conversation: say so, and give the message back to edit or resend.
    userNode.classList.add("failed");
    answer.meta.remove();
    if (outcome === "error") answer.body.append(errorBox(failure, { openKeySettings }));
    else answer.body.append(el("p", { class: "muted", text: "Stopped before the first token." }));
    answer.body.append(el("p", { class: "muted small", text: "This message was not kept; it is back in the message box." }));
    restoreDraft(text, images);
  }
  answer.node.classList.add(`outcome-${outcome}`);
  scrollToEnd();
}

export function stop() {
  if (controller) controller.abort();
}

export function clearConversation() {
  epoch += 1;
  stop();
  history = [];
  restoreAttachments([]);
  ui.log.replaceChildren();
  ui.prompt.value = "";
  showNotice("");
  autosize();
  updateEmpty();
  ui.prompt.focus();
}
