"""The whole stack, as `make up` starts it, driven through the gateway.

Every port is a free one and the state lives in a temporary folder, so this runs beside anything else;
PostgreSQL and Redis are the machine's (a fresh database, a spare Redis database number).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid

import psycopg
import pytest

from cli import servers
from cli.client import ApiError, Client
from services.common import topology

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
ADMIN_KEY = f"llmp_e2e_{uuid.uuid4().hex}"
ADMIN_DATABASE_URL = os.environ.get("LLMP_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


def llmp(*args: str, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli.main", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    name = f"llmp_e2e_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(ADMIN_DATABASE_URL, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    env = {key: value for key, value in os.environ.items() if not key.startswith("LLMP_")}
    env.update({
        "LLMP_STATE_DIR": str(tmp_path_factory.mktemp("llmp-state")),
        "LLMP_DATABASE_URL": ADMIN_DATABASE_URL.rsplit("/", 1)[0] + f"/{name}",
        "LLMP_BROKER_URL": "redis://127.0.0.1:6379/14",
        "LLMP_S3_ENDPOINT": f"127.0.0.1:{servers.free_port()}",
        "LLMP_TRITON_HTTP_URL": f"127.0.0.1:{servers.free_port()}",
        "LLMP_TRITON_GRPC_URL": f"127.0.0.1:{servers.free_port()}",
        "LLMP_TRITON_METRICS_PORT": str(servers.free_port()),
        "LLMP_GATEWAY_PORT": str(servers.free_port()),
        "LLMP_ADMIN_KEY": ADMIN_KEY,
        "LLMP_LOG_FORMAT": "json",
    })
    for service in topology.GRPC_SERVICES:
        env[service.addr_env] = f"127.0.0.1:{servers.free_port()}"
    started = time.monotonic()
    up = llmp("up", env=env)
    up_seconds = time.monotonic() - started
    try:
        assert up.returncode == 0, f"llmp up failed:\n{up.stdout}\n{up.stderr}"
        yield env, up_seconds
    finally:
        down = llmp("down", env=env)
        with psycopg.connect(ADMIN_DATABASE_URL, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        assert down.returncode == 0, f"llmp down failed:\n{down.stdout}\n{down.stderr}"


def client_for(env: dict[str, str], key: str = ADMIN_KEY) -> Client:
    return Client(f"http://127.0.0.1:{env['LLMP_GATEWAY_PORT']}", key)


def test_up_is_healthy_quickly_and_every_service_serves(stack):
    env, up_seconds = stack
    assert up_seconds < 60, f"llmp up took {up_seconds:.1f}s"
    status = llmp("status", "--json", env=env)
    assert status.returncode == 0, status.stderr
    components = json.loads(status.stdout)
    names = {item["name"] for item in components["components"]} if isinstance(components, dict) else \
        {item["name"] for item in components}
    assert {"postgres", "s3", "broker", "triton", "dataset", "training", "registry", "inference", "worker",
            "gateway"} <= names
    import asyncio

    from services.common.grpc_client import health_check

    for service in topology.GRPC_SERVICES:
        assert asyncio.run(health_check(env[service.addr_env])) == "SERVING", service.name
    client = client_for(env)
    assert client.call("GET", "/healthz") == {"status": "ok"}
    ready = client.call("GET", "/readyz")
    assert ready["status"] == "ready" and not ready["failing"]


@pytest.mark.parametrize("path, field", [
    ("/v1/datasets", "datasets"),
    ("/v1/training-jobs", "jobs"),
    ("/v1/models", "models"),
    ("/v1/deployments", "deployments"),
])
def test_a_real_call_reaches_every_service(stack, path, field):
    env, _ = stack
    client = client_for(env)
    listing = client.call("GET", path)
    assert isinstance(listing[field], list)
    with pytest.raises(ApiError) as unauthenticated:
        client_for(env, key="").call("GET", path)
    assert unauthenticated.value.status == 401


def test_the_main_job_end_to_end(stack):
    """Corpus → dataset → Celery/torchrun training → registry → ONNX → Triton → completion."""
    from cli import demo

    env, _ = stack
    corpus = demo.stdlib_docstrings(limit_bytes=200_000)
    text = demo.run(client_for(env), corpus, max_steps=30, prompt="Return the ")
    assert isinstance(text, str) and text


def test_down_leaves_nothing_listening(stack, tmp_path):
    env, _ = stack
    ports = [int(env["LLMP_GATEWAY_PORT"]), int(env["LLMP_TRITON_METRICS_PORT"])]
    ports += [int(env[service.addr_env].rsplit(":", 1)[1]) for service in topology.GRPC_SERVICES]
    ports += [int(env["LLMP_S3_ENDPOINT"].rsplit(":", 1)[1]), int(env["LLMP_TRITON_HTTP_URL"].rsplit(":", 1)[1])]
    down = llmp("down", env=env)
    assert down.returncode == 0, down.stderr
    still_open = [port for port in ports if servers.port_open("127.0.0.1", port)]
    assert not still_open, f"ports still listening after down: {still_open}"
    again = llmp("down", env=env)  # idempotent
    assert again.returncode == 0
