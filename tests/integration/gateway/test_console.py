"""The web console through the whole gateway, which needs its PostgreSQL (the console's files and headers
alone: tests/unit/gateway/test_console.py)."""

from __future__ import annotations

import pytest

from gateway import routes
from gateway.app import init_app
from gateway.views import console
from services.common.config import Settings


@pytest.mark.integration
async def test_through_the_gateway_the_page_is_public_and_the_api_is_not(aiohttp_client, database_url, monkeypatch):
    assert console in routes.VIEW_MODULES
    settings = Settings.from_env({"LLMP_DATABASE_URL": database_url, "LLMP_ADMIN_KEY": "llmp_console_test_admin"})
    client = await aiohttp_client(init_app(settings))
    page = await client.get("/")
    assert page.status == 200 and page.headers["X-Request-Id"]
    assert (await client.get("/console/app.js")).status == 200
    assert (await client.get("/v1/datasets")).status == 401  # the data still needs a key
    missing = await client.get("/console/nope.js")
    assert missing.status == 404 and (await missing.json())["error"]["type"]
