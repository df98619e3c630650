"""The web console's static files: what the gateway serves at `/` and `/console/…`, with which headers,
and that the page's modules form a complete graph the routes cover."""

from __future__ import annotations

import re

import pytest
from aiohttp import web

from gateway.views import console

MODULE_IMPORT = re.compile(r"""^\s*import\s[^;]*?from\s+["']\./([\w./-]+)["']""", re.MULTILINE)
PAGE_REFERENCE = re.compile(r"""(?:src|href)="/console/([\w./-]+)\"""")


@pytest.fixture
async def client(aiohttp_client):
    app = web.Application()
    for route in console.ROUTES:
        app.router.add_route(route.method, route.path, route.handler)
    return await aiohttp_client(app)


def referenced_files() -> set[str]:
    """Every console file reachable from index.html through <script>/<link> and module imports."""
    seen: set[str] = set()
    todo = PAGE_REFERENCE.findall((console.CONSOLE_DIR / "index.html").read_text())
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        if name.endswith(".js"):
            todo.extend(MODULE_IMPORT.findall((console.CONSOLE_DIR / name).read_text()))
    return seen


async def test_root_serves_the_page_with_a_strong_etag_cache_control_and_csp(client):
    response = await client.get("/")
    body = await response.text()
    assert response.status == 200
    assert response.content_type == "text/html" and response.charset == "utf-8"
    assert '<script type="module" src="/console/app.js">' in body and 'id="api-key"' in body
    etag = response.headers["ETag"]
    assert re.fullmatch(r'"[0-9a-f]{32}"', etag)  # strong: no W/ prefix
    assert response.headers["Cache-Control"] == "public, no-cache"
    csp = response.headers["Content-Security-Policy"]
    assert "script-src 'self'" in csp and "connect-src 'self'" in csp and "unsafe-inline" not in csp
    assert response.headers["X-Content-Type-Options"] == "nosniff"


@pytest.mark.parametrize("path", ["/", "/console/app.js", "/console/style.css"])
async def test_if_none_match_answers_304_with_the_same_validators(client, path):
    first = await client.get(path)
    etag = first.headers["ETag"]
    for header in (etag, f"W/{etag}", f'"other", {etag}', "*"):
        again = await client.get(path, headers={"If-None-Match": header})
        assert again.status == 304, header
        assert again.headers["ETag"] == etag and again.headers["Cache-Control"] == first.headers["Cache-Control"]
        assert await again.read() == b""
    changed = await client.get(path, headers={"If-None-Match": '"something-else"'})
    assert changed.status == 200 and await changed.read() == await first.read()


async def test_every_file_the_page_loads_is_served_with_its_type(client):
    needed = referenced_files()
    assert {"app.js", "api.js", "plot.js", "jobs.js", "datasets.js", "models.js", "deployments.js",
            "style.css"} <= needed
    served = {route.path.removeprefix(console.ASSET_PREFIX) for route in console.ROUTES if route.path != "/"}
    assert needed <= served
    for name in sorted(needed):
        response = await client.get(console.ASSET_PREFIX + name)
        assert response.status == 200, name
        expected = "text/javascript" if name.endswith(".js") else "text/css"
        assert response.content_type == expected, name
        assert await response.read() == (console.CONSOLE_DIR / name).read_bytes()


def test_the_etag_changes_with_the_content(tmp_path, monkeypatch):
    (tmp_path / "a.js").write_text("export const a = 1;\n")
    monkeypatch.setattr(console, "CONSOLE_DIR", tmp_path)
    console.load.cache_clear()
    try:
        before = console.load("a.js").etag
        (tmp_path / "a.js").write_text("export const a = 2;\n")
        console.load.cache_clear()
        assert console.load("a.js").etag != before
    finally:
        console.load.cache_clear()


def test_console_routes_are_public_gets_and_unique():
    paths = [route.path for route in console.ROUTES]
    assert paths[0] == "/" and len(paths) == len(set(paths))
    assert all(route.method == "GET" and route.roles == () for route in console.ROUTES)
    assert all(path == "/" or path.startswith(console.ASSET_PREFIX) for path in paths)


def test_scripts_build_the_dom_from_text_only():
    """With the key in sessionStorage, no API-supplied string may become markup or code."""
    for path in console.CONSOLE_DIR.rglob("*.js"):
        source = path.read_text()
        for forbidden in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(",
                          "new Function", "localStorage"):
            assert forbidden not in source, f"{path.name} uses {forbidden}"
    assert 'sessionStorage' in (console.CONSOLE_DIR / "api.js").read_text()
    assert "Authorization: `Bearer ${session.key}`" in (console.CONSOLE_DIR / "api.js").read_text()
