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
export async function api(path, options = {}) {
  return (await withEtag(path, options)).body;
}

// Like api(), also giving the answer's ETag: the If-Match of a later change (`ifMatch`), so a change
// made meanwhile by someone else fails with 412 instead of being overwritten.
export async function withEtag(path, { method = "GET", body, signal, ifMatch, ifNoneMatch } = {}) {
  const extra = body === undefined ? {} : { "Content-Type": "application/json" };
  if (ifMatch) extra["If-Match"] = ifMatch;
  if (ifNoneMatch) extra["If-None-Match"] = ifNoneMatch;
  const response = await fetch(path, {
    method, signal, headers: headers("application/json", extra),
    body: body === undefined ? undefined : JSON.stringify(body),
    cache: method === "GET" ? "no-cache" : "no-store", // an ETag about to guard a change must be current
  });
  if (!response.ok) throw await failure(response);
  return { body: response.status === 204 ? null : await response.json(), etag: response.headers.get("ETag") ?? "" };
}

// POST a file as the raw body with XMLHttpRequest, whose upload events (unlike fetch's) report the bytes
// sent: `progress(sent, total)` as they go. Resolves to the parsed JSON answer; rejects with ApiError.
export function upload(path, file, { progress, contentType = "text/plain" } = {}) {
  return new Promise((resolve, reject) => {
    const request = new XMLHttpRequest();
    request.open("POST", path);
    for (const [name, value] of Object.entries(headers("application/json", { "Content-Type": contentType }))) {
      request.setRequestHeader(name, value);
    }
    request.upload.addEventListener("progress", (event) => progress?.(event.loaded, event.total || file.size));
    request.addEventListener("load", () => {
      let body = null;
      try { body = JSON.parse(request.responseText); } catch { /* not JSON: keep the status line */ }
      if (request.status >= 200 && request.status < 300) return resolve(body);
      const error = body?.error ?? { type: "http", message: `${request.status} ${request.statusText}` };
      if (request.status === 401) window.dispatchEvent(new CustomEvent("llmp:unauthenticated", { detail: error.message }));
      reject(new ApiError(request.status, error.type, error.message));
    });
    request.addEventListener("error", () => reject(new ApiError(0, "network", "the upload failed (connection lost)")));
    request.addEventListener("abort", () => reject(new ApiError(0, "aborted", "the upload was cancelled")));
    request.send(file);
  });
}

// Server-Sent Events read with fetch, because EventSource cannot send an Authorization header.
// Yields {id, event, data} with `data` parsed as JSON; returns at `data: [DONE]` or the end of the stream.
// With `body`, the request is a POST of that JSON (a streamed completion).
export async function* events(path, { signal, body } = {}) {
  const response = await fetch(path, body === undefined ? { signal, headers: headers("text/event-stream") } : {
    method: "POST", signal, body: JSON.stringify(body),
    headers: headers("text/event-stream", { "Content-Type": "application/json" }),
  });
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
