// Model text as DOM, safely: every piece of it becomes a text node, so markup in an answer is shown
// as text and never parsed. Paragraphs keep their line breaks (CSS pre-wrap), ``` / ~~~ fenced
// blocks become <pre><code> with a copy button, and `x` becomes <code>.

import { copyWithFeedback, el } from "./dom.js";

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
 * `text` as a DocumentFragment of paragraphs and code blocks. A stream can cut the text anywhere:
 * an unterminated fence (an answer still streaming) renders as code up to the end.
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
