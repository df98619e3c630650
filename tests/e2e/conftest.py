"""The stack under test: `llmp up` on free ports with a temporary state folder, shared by every e2e test.

PostgreSQL and Redis are the machine's (a fresh database, a spare Redis database number); everything
else (SeaweedFS, Triton, the services, the worker, the gateway) is started by the launcher itself.
Tearing it down checks that `llmp down` leaves no port listening and that a second `down` is harmless.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass

import pytest

from cli import servers
from cli.client import Client
from services.common import topology

from .stack_env import stack_settings


@dataclass
class Stack:
    env: dict[str, str]
    admin_key: str
    up_seconds: float = 0.0

    def llmp(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "cli.main", *args], env=self.env, capture_output=True,
                              text=True, timeout=timeout)

    def client(self, key: str | None = None) -> Client:
        return Client(f"http://127.0.0.1:{self.env['LLMP_GATEWAY_PORT']}", self.admin_key if key is None else key)

    def ports(self) -> list[int]:
        env = self.env
        ports = [int(env["LLMP_GATEWAY_PORT"]), int(env["LLMP_TRITON_METRICS_PORT"])]
        ports += [int(env[service.addr_env].rsplit(":", 1)[1]) for service in topology.GRPC_SERVICES]
        ports += [int(env[name].rsplit(":", 1)[1]) for name in ("LLMP_S3_ENDPOINT", "LLMP_TRITON_HTTP_URL",
                                                                 "LLMP_TRITON_GRPC_URL")]
        return ports


@pytest.fixture(scope="session")
def stack(tmp_path_factory, claim_broker):
    with stack_settings(tmp_path_factory.mktemp("llmp-state"), claim_broker("e2e-stack"), "e2e") as (settings,
                                                                                                       admin_key):
        env = {key: value for key, value in os.environ.items() if not key.startswith("LLMP_")}
        running = Stack(env | settings | {"LLMP_LOG_FORMAT": "json"}, admin_key)
        started = time.monotonic()
        up = running.llmp("up")
        running.up_seconds = time.monotonic() - started
        try:
            assert up.returncode == 0, f"llmp up failed:\n{up.stdout}\n{up.stderr}"
            yield running
            down = running.llmp("down")
            assert down.returncode == 0, f"llmp down failed:\n{down.stdout}\n{down.stderr}"
            still_open = [port for port in running.ports() if servers.port_open("127.0.0.1", port)]
            assert not still_open, f"ports still listening after down: {still_open}"
            assert running.llmp("down").returncode == 0  # idempotent
        finally:
            running.llmp("down")
