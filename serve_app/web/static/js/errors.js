// How a failed request is shown in its turn: a title from the HTTP status, the server's message,
// a hint on what to do, a countdown when the server says when to retry, and a way to the API key
// when the key was refused.

import { ApiError } from "./api.js";
import { el } from "./dom.js";

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

export function errorTitle(error) {
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

function retryCountdown(seconds) {
  const retry = el("span", { class: "retry", role: "timer" });
  let left = seconds;
  const tick = () => {
    retry.textContent = left > 0 ? `You can retry in ${left} s.` : "You can retry now.";
    if (left > 0) {
      left -= 1;
      setTimeout(() => retry.isConnected && tick(), 1000);
    }
  };
  tick();
  return retry;
}

/** The alert box for `error`; `openKeySettings` is called by its button when the key was refused. */
export function errorBox(error, { openKeySettings }) {
  const box = el("div", { class: "turn-error", role: "alert" });
  box.append(el("strong", { text: `${errorTitle(error)}: ` }), document.createTextNode(error.message || ""));
  const hint = errorHint(error);
  if (hint) box.append(" ", el("span", { class: "hint-inline", text: hint }));
  if (error instanceof ApiError && error.retryAfter !== null && [429, 503].includes(error.status)) {
    box.append(retryCountdown(error.retryAfter));
  }
  if (error instanceof ApiError && [401, 403].includes(error.status)) {
    box.append(
      " ",
      el("button", { type: "button", class: "btn btn-ghost btn-small", text: "Open settings", onclick: openKeySettings }),
    );
  }
  return box;
}
