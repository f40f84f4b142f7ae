// Images attached to the next message: picked, pasted or dropped anywhere on the page, checked for
// type and size before they are read, previewed with a remove button, and sent as data URLs.

import { el, formatBytes } from "./dom.js";
import { showNotice, ui } from "./view.js";

export const MAX_IMAGE_BYTES = 5 * 1024 * 1024; // the server's default images.max_image_bytes
export const MAX_IMAGES_PER_TURN = 8;
const TYPES = { "image/jpeg": "JPG", "image/png": "PNG", "image/webp": "WebP", "image/gif": "GIF" };
const EXTENSIONS = { jpg: "image/jpeg", jpeg: "image/jpeg", png: "image/png", webp: "image/webp", gif: "image/gif" };

let attached = []; // {id, name, size, type, dataUrl}
let nextId = 1;

/** The image type of `file`, from its MIME type or, when the browser gives none, its extension. */
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
    if (attached.length >= MAX_IMAGES_PER_TURN) {
      problems.push(`At most ${MAX_IMAGES_PER_TURN} images per message; ${name} was not attached.`);
      continue;
    }
    try {
      const dataUrl = await readDataUrl(file, mime);
      attached.push({ id: nextId++, name, size: file.size, type: mime, dataUrl });
    } catch {
      problems.push(`${name} could not be read.`);
    }
  }
  showNotice(problems.join(" "));
  renderAttachments();
}

export const attachmentCount = () => attached.length;

/** Hand the attached images over to a message, leaving none attached. */
export function takeAttachments() {
  const taken = attached;
  attached = [];
  renderAttachments();
  return taken;
}

/** Attach `images` again (a message that failed comes back to the composer). */
export function restoreAttachments(images) {
  attached = images.slice();
  renderAttachments();
}

function removeAttachment(id) {
  const index = attached.findIndex((a) => a.id === id);
  if (index < 0) return;
  attached.splice(index, 1);
  renderAttachments();
  const buttons = ui.attachments.querySelectorAll("button.remove");
  (buttons[Math.min(index, buttons.length - 1)] || ui.prompt).focus();
}

export function renderAttachments() {
  ui.attachments.replaceChildren(
    ...attached.map((a) => {
      const img = el("img", { src: a.dataUrl, alt: a.name, title: `${a.name} · ${formatBytes(a.size)}` });
      img.addEventListener("error", () => {
        attached = attached.filter((x) => x.id !== a.id);
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
  ui.attachments.hidden = attached.length === 0;
}

function hasFiles(event) {
  return Array.from((event.dataTransfer && event.dataTransfer.types) || []).includes("Files");
}

/** The three ways in: the file picker, pasting anywhere, and dropping anywhere on the page. */
export function wireAttachmentInputs() {
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

  // dragenter/dragleave fire for every child crossed: count them to know when the drag left the page.
  let dragDepth = 0;
  document.addEventListener("dragenter", (e) => {
    if (!hasFiles(e)) return;
    e.preventDefault();
    dragDepth += 1;
    ui.dropOverlay.hidden = false;
  });
  document.addEventListener("dragover", (e) => {
    if (!hasFiles(e)) return;
    e.preventDefault();
    e.dataTransfer.dropEffect = "copy";
  });
  document.addEventListener("dragleave", () => {
    dragDepth = Math.max(0, dragDepth - 1);
    if (dragDepth === 0) ui.dropOverlay.hidden = true;
  });
  document.addEventListener("drop", (e) => {
    dragDepth = 0;
    ui.dropOverlay.hidden = true;
    if (!e.dataTransfer || !e.dataTransfer.files.length) return;
    e.preventDefault();
    addFiles(e.dataTransfer.files);
    ui.prompt.focus();
  });
}
