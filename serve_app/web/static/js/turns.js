// The DOM of one exchange in the log: the user's turn (images and text) and the assistant's turn
// (the answer body, then a line of figures and a copy button once it is done).

import { el } from "./dom.js";

export function userTurn(text, images) {
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

/** An assistant turn waiting for its answer, and the parts of it that are filled in later. */
export function assistantTurn() {
  const body = el("div", { class: "answer-body" }, el("span", { class: "typing", text: "Thinking…" }));
  const stats = el("span", { class: "answer-stats" });
  const copy = el("button", { type: "button", class: "btn btn-ghost btn-small copy", text: "Copy", disabled: true });
  copy.setAttribute("aria-label", "Copy answer");
  const meta = el("div", { class: "answer-meta" }, stats, copy);
  const node = el("li", { class: "turn assistant", "aria-busy": "true" });
  node.append(el("h3", { class: "visually-hidden", text: "Assistant" }), el("div", { class: "bubble" }, body, meta));
  return { node, body, stats, copy, meta };
}
