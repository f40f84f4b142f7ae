// The client of the same origin's OpenAI routes: GET /v1/models and a streaming
// POST /v1/chat/completions, read as server-sent events from the fetch body's ReadableStream.
// Aborting the signal passed to streamChat closes the connection, which is what tells the server
// to stop generating.

export class ApiError extends Error {
  constructor(message, { status = 0, type = "", code = "", retryAfter = null } = {}) {
    super(message);
    this.name = "ApiError";
    this.status = status;
    this.type = type;
    this.code = code;
    this.retryAfter = retryAfter; // seconds, for 429 and 503
  }
}

function retryAfterSeconds(header) {
  if (!header) return null;
  const seconds = Number(header);
  if (Number.isFinite(seconds)) return Math.max(0, Math.ceil(seconds));
  const date = Date.parse(header);
  return Number.isNaN(date) ? null : Math.max(0, Math.ceil((date - Date.now()) / 1000));
}

/** An ApiError from a non-2xx response, reading OpenAI's `{"error": {...}}` body when present. */
async function httpError(response) {
  let message = "";
  let type = "";
  let code = "";
  const body = await response.text().catch(() => "");
  try {
    const error = JSON.parse(body).error;
    if (typeof error === "string") message = error;
    else if (error) ({ message = "", type = "", code = "" } = error);
  } catch {
    message = body.slice(0, 500);
  }
  return new ApiError(message || response.statusText || "Request failed.", {
    status: response.status,
    type,
    code: code || "",
    retryAfter: retryAfterSeconds(response.headers.get("Retry-After")),
  });
}

function authHeaders(apiKey) {
  const key = (apiKey || "").trim();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

/** The `data` payloads of the server-sent events in a byte stream, one string per event. */
export async function* sseData(stream) {
  const reader = stream.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  let data = [];
  let finished = false;
  const line = function* (text) {
    if (text === "") {
      if (data.length) yield data.join("\n");
      data = [];
    } else if (text.startsWith("data:")) {
      data.push(text.slice(text[5] === " " ? 6 : 5));
    } // comments (":") and other fields (event, id, retry) are not used by OpenAI streams
  };
  try {
    for (;;) {
      const { value, done } = await reader.read();
      buffer += done ? decoder.decode() : decoder.decode(value, { stream: true });
      // Split into lines; a trailing "\r" may be half of a "\r\n", so it waits for the next read.
      const parts = buffer.split(/\r\n|\n|\r(?!$)/);
      buffer = done ? "" : parts.pop();
      for (const text of parts) yield* line(text);
      if (done) {
        if (buffer) yield* line(buffer);
        yield* line("");
        finished = true;
        return;
      }
    }
  } finally {
    if (!finished) reader.cancel().catch(() => {});
    reader.releaseLock();
  }
}

/** The served models: OpenAI's model objects, the first one the model and the rest its aliases. */
export async function listModels(apiKey) {
  const response = await fetch("/v1/models", { headers: authHeaders(apiKey) });
  if (!response.ok) throw await httpError(response);
  return (await response.json()).data || [];
}

/**
 * POST `body` (a chat-completions request with `stream: true`) and yield its chunks as objects
 * until `[DONE]`. An error status, or an error event inside the stream, throws an ApiError;
 * aborting `signal` throws an AbortError.
 */
export async function* streamChat(body, { apiKey, signal }) {
  const response = await fetch("/v1/chat/completions", {
    method: "POST",
    headers: { "Content-Type": "application/json", Accept: "text/event-stream", ...authHeaders(apiKey) },
    body: JSON.stringify(body),
    signal,
  });
  if (!response.ok) throw await httpError(response);
  if (!response.body) throw new ApiError("The server sent no body.");
  for await (const data of sseData(response.body)) {
    if (data === "[DONE]") return;
    let chunk;
    try {
      chunk = JSON.parse(data);
    } catch {
      continue; // not JSON: nothing this page can show
    }
    if (chunk.error) {
      const e = chunk.error;
      throw new ApiError(e.message || "The answer failed.", { type: e.type, code: e.code });
    }
    yield chunk;
  }
}
