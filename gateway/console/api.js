// The REST API as the console uses it: every call carries the key kept in sessionStorage.

const KEY = "llmp.apiKey";

export const session = {
  get key() { return sessionStorage.getItem(KEY) ?? ""; },
  set(key) { sessionStorage.setItem(KEY, key); },
  clear() { sessionStorage.removeItem(KEY); },
};

// An error answer of the API: {"error": {"type", "message"}} with its HTTP status.
export class ApiError extends Error {
  constructor(status, type, message) {
    super(message);
    this.status = status;
    this.type = type;
  }
}

function headers(accept, extra = {}) {
  return { Accept: accept, Authorization: `Bearer ${session.key}`, ...extra };
}

async function failure(response) {
  let type = "http", message = `${response.status} ${response.statusText}`;
  try {
    const body = await response.json();
    ({ type, message } = body.error ?? { type, message });
  } catch { /* not a JSON error body: keep the status line */ }
  if (response.status === 401) window.dispatchEvent(new CustomEvent("llmp:unauthenticated", { detail: message }));
  return new ApiError(response.status, type, message);
}

// GET (or another method with a JSON body) → the parsed JSON answer; throws ApiError.
// The browser's HTTP cache revalidates with If-None-Match, so unchanged resources come back as 304s.
export async function api(path, { method = "GET", body, signal } = {}) {
  const extra = body === undefined ? {} : { "Content-Type": "application/json" };
  const response = await fetch(path, {
    method, signal, headers: headers("application/json", extra),
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (!response.ok) throw await failure(response);
  return response.status === 204 ? null : response.json();
}

// Server-Sent Events read with fetch, because EventSource cannot send an Authorization header.
// Yields {id, event, data} with `data` parsed as JSON; returns at `data: [DONE]` or the end of the stream.
export async function* events(path, { signal } = {}) {
  const response = await fetch(path, { signal, headers: headers("text/event-stream") });
  if (!response.ok) throw await failure(response);
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += value.replaceAll("\r\n", "\n");
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        const message = { id: "", event: "message", data: "" };
        for (const line of block.split("\n")) {
          const colon = line.indexOf(":");
          if (colon <= 0) continue; // comments and bare field names carry nothing we use
          const field = line.slice(0, colon), text = line.slice(colon + 1).replace(/^ /, "");
          if (field === "data") message.data += (message.data ? "\n" : "") + text;
          else if (field === "id" || field === "event") message[field] = text;
        }
        if (message.data === "[DONE]") return;
        if (message.data) yield { ...message, data: JSON.parse(message.data) };
      }
    }
  } finally {
    reader.cancel().catch(() => {});
  }
}
