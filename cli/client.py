"""A small synchronous client of llmp's REST API, for the CLI and the demo."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any


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
            return urllib.request.urlopen(request, timeout=self.timeout)
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

    def upload(self, path: str, data: bytes | Path, *, query: dict | None = None,
               content_type: str = "application/octet-stream") -> Any:
        body = data.read_bytes() if isinstance(data, Path) else data
        with self._request("POST", path, body=body, query=query, content_type=content_type) as response:
            return json.loads(response.read())

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
