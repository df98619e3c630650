"""A small synchronous client of llmp's REST API, for the CLI and the demo."""

from __future__ import annotations

import http.client
import json
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

UPLOAD_CHUNK = 256 * 1024  # bytes handed to the socket at a time when a file is uploaded
RETRYABLE = {0, 502, 503, 504}  # unreachable, or a gateway/backend briefly away: a stream is resumed


class ApiError(Exception):
    """An error answer of the API, with its status and the `{"error": …}` body."""

    def __init__(self, status: int, kind: str, message: str) -> None:
        super().__init__(f"{status} {kind}: {message}")
        self.status, self.kind, self.message = status, kind, message


def default_base_url() -> str:
    return os.environ.get("LLMP_URL") or f"http://127.0.0.1:{os.environ.get('LLMP_GATEWAY_PORT', '8080')}"


def default_key(state_dir: str | None = None) -> str:
    """LLMP_API_KEY, else LLMP_ADMIN_KEY, else the admin key `make up` wrote."""
    key = os.environ.get("LLMP_API_KEY") or os.environ.get("LLMP_ADMIN_KEY")
    if key:
        return key
    path = Path(state_dir or os.environ.get("LLMP_STATE_DIR", ".llmp")) / "admin.key"
    return path.read_text().strip() if path.exists() else ""


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urllib.parse.urlsplit(url)
    return parts.scheme.lower(), (parts.hostname or "").lower(), parts.port or {"http": 80, "https": 443}.get(
        parts.scheme.lower())


class _SameOriginRedirects(urllib.request.HTTPRedirectHandler):
    """Follows a redirect only within the API's origin (scheme, host, port). urllib copies every header into
    the redirected request, Authorization included: the API key must never reach another server."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if _origin(newurl) != _origin(req.full_url):
            fp.close()
            raise ApiError(code, "redirect", f"refusing to follow a redirect to another origin ({newurl}): "
                                             "the request carries the API key")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


_OPENER = urllib.request.build_opener(_SameOriginRedirects)


@dataclass(frozen=True)
class Event:
    """One Server-Sent Event: its `id` (may be empty), `event` type and `data` decoded from JSON."""

    id: str
    event: str
    data: Any


class StreamDropped(Exception):
    """An event stream ended before its `[DONE]` (connection closed or reset, read timed out)."""


def parse_events(lines: Iterator[bytes]) -> Iterator[Event | None]:
    """Events of an SSE body (WHATWG event-stream format); None for the terminating `data: [DONE]`."""
    event_id, kind, data = "", "message", []
    for raw_line in lines:
        line = raw_line.decode().rstrip("\r\n")
        if not line:
            if data:
                text = "\n".join(data)
                yield None if text == "[DONE]" else Event(event_id, kind, json.loads(text))
            event_id, kind, data = event_id, "message", []  # the last id persists, as in EventSource
            continue
        if line.startswith(":"):
            continue  # a comment (keep-alive)
        field, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if field == "data":
            data.append(value)
        elif field == "event":
            kind = value
        elif field == "id":
            event_id = value


class Client:
    def __init__(self, base_url: str | None = None, key: str | None = None, timeout: float = 60.0) -> None:
        self.base_url = (base_url or default_base_url()).rstrip("/")
        self.key = key if key is not None else default_key()
        self.timeout = timeout

    def _request(self, method: str, path: str, *, body: bytes | None = None, query: dict | None = None,
                 headers: dict[str, str] | None = None, content_type: str = "application/json"):
        url = self.base_url + path
        if query:
            url += "?" + urllib.parse.urlencode({k: v for k, v in query.items() if v is not None})
        all_headers = {"Accept": "application/json", **(headers or {})}
        if self.key:
            all_headers["Authorization"] = f"Bearer {self.key}"
        if body is not None:
            all_headers["Content-Type"] = content_type
        request = urllib.request.Request(url, data=body, method=method, headers=all_headers)
        try:
            return _OPENER.open(request, timeout=self.timeout)
        except urllib.error.HTTPError as error:
            raw = error.read()
            try:
                detail = json.loads(raw)["error"]
                raise ApiError(error.code, detail.get("type", ""), detail.get("message", "")) from None
            except (ValueError, KeyError, TypeError):
                raise ApiError(error.code, "http", raw.decode(errors="replace")[:500]) from None
        except urllib.error.URLError as error:
            raise ApiError(0, "unreachable", f"{self.base_url}: {error.reason}") from None

    def call(self, method: str, path: str, payload: Any = None, *, query: dict | None = None,
             headers: dict[str, str] | None = None) -> Any:
        body = json.dumps(payload).encode() if payload is not None else None
        with self._request(method, path, body=body, query=query, headers=headers) as response:
            raw = response.read()
            return json.loads(raw) if raw else None

    def wait_until(self, path: str, done: Callable[[Any], bool], timeout: float, pause: float = 0.5) -> Any:
        """GET `path` until `done(resource)`; TimeoutError naming the last state after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            resource = self.call("GET", path)
            if done(resource):
                return resource
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{path} did not get there in {timeout:.0f}s: {resource}")
            time.sleep(pause)

    def call_with_etag(self, path: str) -> tuple[Any, str]:
        with self._request("GET", path) as response:
            return json.loads(response.read()), response.headers.get("ETag", "")

    def put_conditionally(self, path: str, payload: Any) -> Any:
        """PUT `payload` to `path` as a precondition-guarded create or update: If-Match with the current
        ETag when the resource exists, If-None-Match: * when it does not (so a concurrent change fails
        with 412 instead of being overwritten)."""
        try:
            _, etag = self.call_with_etag(path)
            headers = {"If-Match": etag}
        except ApiError as error:
            if error.status != 404:
                raise
            headers = {"If-None-Match": "*"}
        return self.call("PUT", path, payload, headers=headers)

    def upload(self, path: str, data: bytes | Path | tuple[Iterable[bytes], int], *, query: dict | None = None,
               content_type: str = "application/octet-stream",
               progress: Callable[[int, int], None] | None = None) -> Any:
        """POST `data` (bytes, a file streamed from disk, or (chunks, their total length) made on the fly) to
        `path`; `progress(sent, total)` after each chunk is handed to the socket."""
        if isinstance(data, Path):
            total = data.stat().st_size
            body: Any = _file_chunks(data, total, progress)
        elif isinstance(data, tuple):
            chunks, total = data
            body = _counted(chunks, total, progress)
        else:
            total, body = len(data), data
        with self._request("POST", path, body=body, query=query, content_type=content_type,
                           headers={"Content-Length": str(total)}) as response:
            if progress is not None and isinstance(data, bytes):
                progress(total, total)
            return json.loads(response.read())

    def download(self, path: str, progress: Callable[[int, int], None] | None = None) -> Iterator[bytes]:
        """GET `path` as a byte stream (chunks as they arrive); `progress(received, Content-Length)` after each.
        A body that ends short of its Content-Length (the server cut it) raises ApiError."""
        with self._request("GET", path, headers={"Accept": "application/x-tar"}) as response:
            total = int(response.headers.get("Content-Length") or 0)
            received = 0
            try:
                while chunk := response.read(UPLOAD_CHUNK):
                    received += len(chunk)
                    if progress is not None:
                        progress(received, total)
                    yield chunk
            except (http.client.HTTPException, OSError) as error:  # IncompleteRead, reset
                raise ApiError(0, "download", f"{path}: cut after {received} bytes: {error}") from None
            if total and received != total:
                raise ApiError(0, "download", f"{path}: cut after {received} of {total} bytes")

    def follow(self, path: str, *, last_event_id: str = "", max_failures: int = 10,
               backoff: float = 0.5) -> Iterator[Event]:
        """The Server-Sent Events of `path` until `[DONE]`, resuming a dropped connection with `Last-Event-ID`
        (the id of the last event received), so no event is lost or repeated.

        A reconnection that fails is retried with growing pauses; `max_failures` in a row give up with the
        last error. A read that times out (nothing happened for `timeout` seconds) just reconnects. Errors the
        API answers (404, 401…) are not retried.
        """
        failures = 0
        while True:
            headers = {"Accept": "text/event-stream"}
            if last_event_id:
                headers["Last-Event-ID"] = last_event_id
            try:
                with self._request("GET", path, headers=headers) as response:
                    for event in parse_events(response):
                        if event is None:
                            return
                        if event.id:
                            last_event_id = event.id
                        failures = 0  # an event came through: only failures in a row count
                        yield event
                raise StreamDropped(f"{path}: the stream ended before [DONE]")
            except TimeoutError:
                continue  # connected, but nothing to tell within the read timeout (a job waiting for a worker)
            except ApiError as error:
                if error.status not in RETRYABLE:
                    raise
                problem: Exception = error
            except (StreamDropped, OSError, http.client.HTTPException) as error:  # reset, timeout, cut mid-chunk
                problem = error
            failures += 1
            if failures >= max_failures:
                raise ApiError(0, "stream", f"{path}: gave up after {failures} failed reconnections: {problem}")
            time.sleep(min(5.0, backoff * 2 ** (failures - 1)))

    def events(self, path: str, payload: Any = None, method: str = "GET") -> Iterator[Any]:
        """Server-Sent Events of `path`, each `data:` line decoded as JSON, until `[DONE]` or the end."""
        body = json.dumps(payload).encode() if payload is not None else None
        with self._request(method, path, body=body, headers={"Accept": "text/event-stream"}) as response:
            for raw_line in response:
                line = raw_line.decode().rstrip("\r\n")
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    return
                yield json.loads(data)


def _counted(chunks: Iterable[bytes], total: int, progress: Callable[[int, int], None] | None) -> Iterator[bytes]:
    sent = 0
    if progress is not None:
        progress(0, total)
    for chunk in chunks:
        yield chunk
        sent += len(chunk)
        if progress is not None:
            progress(sent, total)


def _file_chunks(path: Path, total: int, progress: Callable[[int, int], None] | None) -> Iterator[bytes]:
    """The file's bytes in chunks; `progress(sent, total)` once each chunk has been written to the socket
    (http.client sends a chunk before asking for the next)."""
    sent = 0
    if progress is not None:
        progress(0, total)
    with path.open("rb") as file:
        while chunk := file.read(UPLOAD_CHUNK):
            yield chunk
            sent += len(chunk)
            if progress is not None:
                progress(sent, total)
