"""The serving stack the inference, chat and embeddings benchmarks measure, started as deployed: a database of
its own, tritonserver, the inference service (reading the model from a local tree in the registry's layout) and
the gateway, each its own process on free ports; the bench's model deployed through the REST API and READY.

    async with serving_stack(work, clients=16) as stack:
        async with stack.http.post(f"{stack.url}/v1/completions", json=...) as response: ...

`work` holds the published model (`model_source.publish_local_version`) and gets the processes' logs. On the
way out every process is stopped and the database dropped, whatever happened.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import psycopg

from cli.servers import TritonPorts, free_port, http_ok, port_open, start_triton, stop, wait_until
from services.common.config import Settings

ADMIN_URL = os.environ.get("LLMP_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
TENANT = "default"  # the bootstrap admin key's tenant
MODEL = DEPLOYMENT = "bench"


@dataclass
class Stack:
    url: str  # the gateway
    http: aiohttp.ClientSession  # authenticated as the bootstrap admin
    triton_grpc: str  # host:port, for a client that calls Triton directly
    work: Path


def spawn(command: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen:
    # The benchmarks' own variables (LLMP_BENCH_ALLOW_BUSY) are no setting of the servers, which refuse unknown ones.
    inherited = {key: value for key, value in os.environ.items() if not key.startswith("LLMP_BENCH_")}
    with open(log_path, "ab") as log:
        return subprocess.Popen(command, env={**inherited, **env}, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)


async def deploy(http: aiohttp.ClientSession, url: str) -> None:
    """Deploy version 1 of the bench's model as the bench's deployment and wait until it is READY."""
    async with http.put(f"{url}/v1/deployments/{DEPLOYMENT}", json={"model": MODEL, "stable": 1},
                        headers={"If-None-Match": "*"}) as response:
        if response.status not in (200, 201):
            raise RuntimeError(f"deploy failed: {response.status} {await response.text()}")
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        async with http.get(f"{url}/v1/deployments/{DEPLOYMENT}") as response:
            state = (await response.json()).get("state")
        if state == "READY":
            return
        if state == "FAILED":
            raise RuntimeError("deployment failed")
        await asyncio.sleep(0.2)
    raise TimeoutError("deployment did not become READY")


@asynccontextmanager
async def serving_stack(work: Path, clients: int, env: dict[str, str] | None = None) -> AsyncIterator[Stack]:
    """The stack serving the model published in `work`, deployed; `clients` sizes the HTTP connection pool.
    `env`: more variables for the inference service and the gateway."""
    db_name = f"llmp_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{db_name}"')
    ports = TritonPorts.free()
    repository = work / "repository"
    gateway_port, admin_key = free_port(), secrets.token_urlsafe(24)
    inference_host, inference_port = "127.0.0.1", free_port()
    env = {"LLMP_DATABASE_URL": ADMIN_URL.rsplit("/", 1)[0] + f"/{db_name}", "LLMP_STATE_DIR": str(work),
           "LLMP_TRITON_GRPC_URL": f"127.0.0.1:{ports.grpc}", "LLMP_TRITON_MODEL_REPOSITORY": str(repository),
           "LLMP_INFERENCE_ADDR": f"{inference_host}:{inference_port}", "LLMP_GATEWAY_PORT": str(gateway_port),
           "LLMP_ADMIN_KEY": admin_key, "LLMP_LOG_LEVEL": "WARNING", "LLMP_LOG_FORMAT": "text", **(env or {})}
    processes: list[subprocess.Popen] = []
    try:
        processes.append(start_triton(repository, ports, work / "triton.log"))
        processes.append(spawn([sys.executable, "-m", "bench.serving", str(work)], env, work / "inference.log"))
        processes.append(spawn([sys.executable, "-m", "gateway.server"], env, work / "gateway.log"))
        url = f"http://127.0.0.1:{gateway_port}"
        wait_until(lambda: port_open(inference_host, inference_port), 120, processes[1], work / "inference.log",
                   "inference")
        wait_until(lambda: http_ok(f"{url}/healthz"), 120, processes[2], work / "gateway.log", "gateway")
        connector = aiohttp.TCPConnector(limit=clients + 4)
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {admin_key}"},
                                         connector=connector) as http:
            await deploy(http, url)
            yield Stack(url, http, f"127.0.0.1:{ports.grpc}", work)
    finally:
        for process in reversed(processes):
            stop(process)
        with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)')


async def serve_inference(root: Path) -> None:
    """The inference service on LLMP_INFERENCE_ADDR, reading models from the local tree `root`, until SIGTERM."""
    from services.inference import server
    from services.inference.model_source import LocalModelSource

    app, _ = await server.build(Settings.from_env(), LocalModelSource(root))
    await app.start()
    stopping = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stopping.set)
    await stopping.wait()
    await app.stop()


if __name__ == "__main__":  # `python -m bench.serving ROOT`: the stack's inference service process
    from services.common import logs

    logs.configure(Settings.from_env(), "inference")
    asyncio.run(serve_inference(Path(sys.argv[1])))
