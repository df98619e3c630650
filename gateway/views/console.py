"""The web console: static HTML/CSS/JS modules from `gateway/console/`, served at `/` and `/console/…`.

No build step and no CDN: the browser loads the files as they are. The routes are public (the page
itself holds no data); every API call the page makes sends the key the user typed as
`Authorization: Bearer`, so the console sees exactly what that key may see.

Each file is read once, on first request, and answered with a strong ETag (SHA-256 of its bytes) and
`Cache-Control: no-cache`, so a browser revalidates with `If-None-Match` and gets a 304 until the
gateway is upgraded. A strict Content-Security-Policy keeps the key in sessionStorage safe from
injected scripts: only the console's own files run, and the page talks only to its own origin.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from gateway.http import Route, none_match

CONSOLE_DIR = Path(__file__).resolve().parent.parent / "console"
ASSET_PREFIX = "/console/"

CONTENT_TYPES = {
    ".html": "text/html",
    ".js": "text/javascript",
    ".css": "text/css",
    ".svg": "image/svg+xml",
}
CACHE_CONTROL = "public, no-cache"
SECURITY_HEADERS = {
    "Content-Security-Policy": ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                                "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}


@dataclass(frozen=True)
class Asset:
    body: bytes
    etag: str
    content_type: str


@functools.cache
def load(name: str) -> Asset:
    """One console file with its strong ETag (read once per process)."""
    body = (CONSOLE_DIR / name).read_bytes()
    etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
    return Asset(body, etag, CONTENT_TYPES[Path(name).suffix])


def serve(name: str):
    """A handler answering `name` with 200, or 304 when If-None-Match matches its ETag."""

    async def handler(request: web.Request) -> web.Response:
        asset = load(name)
        headers = {"ETag": asset.etag, "Cache-Control": CACHE_CONTROL, **SECURITY_HEADERS}
        if none_match(request.headers.get("If-None-Match"), asset.etag):
            return web.Response(status=304, headers=headers)
        return web.Response(body=asset.body, content_type=asset.content_type, charset="utf-8", headers=headers)

    handler.__name__ = f"console_{Path(name).stem}"
    return handler


def asset_names() -> list[str]:
    """Every file the console is made of, relative to `gateway/console/`, in a stable order."""
    return sorted(str(path.relative_to(CONSOLE_DIR)) for path in CONSOLE_DIR.rglob("*")
                  if path.is_file() and path.suffix in CONTENT_TYPES)


ROUTES = [
    Route("GET", "/", serve("index.html"), "The web console (HTML)", roles=(), tag="console"),
    *(Route("GET", ASSET_PREFIX + name, serve(name), f"Web console file {name}", roles=(), tag="console")
      for name in asset_names() if name != "index.html"),
]
