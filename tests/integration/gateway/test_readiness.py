"""Readiness means this gateway process can serve; backend health is `GET /v1/status`.

Against real PostgreSQL and S3 with no gRPC service running (their addresses are free ports): every
replica would stay in the load balancer, requests that need a service get 503 with Retry-After, the
others keep working, and `/v1/status` names each backend.
"""

import time

import pytest

from gateway.app import init_app
from services.common import topology
from services.common.config import Settings
from services.common.s3 import ObjectStore

pytestmark = pytest.mark.integration
ADMIN_KEY = "llmp_bootstrap_readiness-admin-secret"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
SERVICES = {service.name for service in topology.GRPC_SERVICES}


@pytest.fixture
async def client(aiohttp_client, settings_env):
    settings = Settings.from_env({**settings_env, "LLMP_ADMIN_KEY": ADMIN_KEY})
    ObjectStore(settings.s3).ensure_bucket()  # what the services do at start
    return await aiohttp_client(init_app(settings))


@pytest.fixture
async def client_without_s3(aiohttp_client, settings_env):
    from cli import servers

    dead = f"127.0.0.1:{servers.free_port()}"  # nothing listens: S3 is down for this gateway
    settings = Settings.from_env({**settings_env, "LLMP_ADMIN_KEY": ADMIN_KEY, "LLMP_S3_ENDPOINT": dead})
    client = await aiohttp_client(init_app(settings))
    client.dead_endpoint = dead
    return client


async def test_ready_while_every_grpc_service_is_down(client):
    response = await client.get("/readyz")
    assert response.status == 200, await response.text()
    assert (await response.json())["status"] == "ready"


async def test_a_request_needing_a_down_service_gets_503_and_the_others_work(client):
    needs_dataset = await client.get("/v1/datasets", headers=ADMIN)
    assert needs_dataset.status == 503, await needs_dataset.text()
    assert int(needs_dataset.headers["Retry-After"]) >= 1
    assert (await needs_dataset.json())["error"]["type"] == "unavailable"
    keys = await client.get("/v1/api-keys", headers=ADMIN)  # PostgreSQL only: still served
    assert keys.status == 200, await keys.text()
    assert (await client.get("/readyz")).status == 200


async def test_status_names_every_backend_and_needs_a_key(client):
    assert (await client.get("/v1/status")).status == 401
    response = await client.get("/v1/status", headers=ADMIN)
    body = await response.json()
    assert response.status == 503 and int(response.headers["Retry-After"]) >= 1
    assert set(body["backends"]) == {"postgresql", "s3", *SERVICES}
    assert body["backends"]["postgresql"] == body["backends"]["s3"] == "SERVING"  # the real servers are up
    assert set(body["failing"]) == SERVICES  # no gRPC service runs here


async def test_readiness_does_not_ask_s3_and_leaks_nothing(client_without_s3):
    started = time.monotonic()
    ready = await client_without_s3.get("/readyz")
    assert ready.status == 200 and time.monotonic() - started < 1.0
    status = await client_without_s3.get("/v1/status", headers=ADMIN)
    body = await status.json()
    assert body["backends"]["s3"] == "DOWN" and "s3" in body["failing"]
    for text in (await ready.text(), await status.text()):
        assert client_without_s3.dead_endpoint not in text  # no internal error string or address


async def test_draining_turns_readiness_off(client):
    assert (await client.get("/readyz")).status == 200
    await client.app.shutdown()  # what SIGTERM starts: on_shutdown handlers run before cleanup
    response = await client.get("/readyz")
    assert response.status == 503 and response.headers["Retry-After"]
    assert (await response.json())["reasons"] == ["shutting down"]


async def test_a_second_gateway_refuses_to_generate_its_own_admin_key(aiohttp_client, settings_env, tmp_path):
    """Replicas without LLMP_ADMIN_KEY would each generate a different admin key: the second one to start
    on the same database refuses, naming the setting; with LLMP_ADMIN_KEY shared, replicas start."""
    from services.common import errors

    def settings(state: str, key: str = "") -> Settings:
        return Settings.from_env({**settings_env, "LLMP_ADMIN_KEY": key, "LLMP_STATE_DIR": str(tmp_path / state)})

    first = await aiohttp_client(init_app(settings("one")))
    assert (await first.get("/readyz")).status == 200
    from aiohttp import web

    runner = web.AppRunner(init_app(settings("two")))
    with pytest.raises(errors.PreconditionFailed, match="LLMP_ADMIN_KEY"):
        await runner.setup()  # startup: what `python -m gateway.server` runs first
    await runner.cleanup()
    assert not (tmp_path / "two" / "admin.key").exists()  # refused before generating anything
    shared = [await aiohttp_client(init_app(settings(f"s{i}", ADMIN_KEY))) for i in range(2)]
    for replica in shared:
        assert (await replica.get("/v1/api-keys", headers=ADMIN)).status == 200
    await first.close()  # the lock goes with it: a gateway with its own key may start again
    again = await aiohttp_client(init_app(settings("three")))
    assert (await again.get("/readyz")).status == 200
