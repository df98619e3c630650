"""The stack the reliability suite attacks: `llmp up` on free ports, owning every server it may break.

Unlike the e2e stack, this one owns its PostgreSQL too: `LLMP_DATABASE_URL` points at a closed port, so
the launcher starts the embedded server (pgserver) and the suite can stop and restart it. SeaweedFS,
Triton, the services, the worker and the gateway are the launcher's as well; only the broker is the
machine's Redis (a spare database number).

Durations scale with `LLMP_RELIABILITY_SCALE` (default 1: the CI-sized run, a few seconds per phase;
10 is the full-length run of issue 9). `LLMP_RELIABILITY_STACK=<state dir>` reuses a stack already
brought up with that state dir (for iterating on the suite) and leaves it running.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests

from cli import servers
from cli.client import Client
from services.common import topology
from tests import identities

SCALE = float(os.environ.get("LLMP_RELIABILITY_SCALE", "1"))
REUSE = os.environ.get("LLMP_RELIABILITY_STACK", "")
TENANTS = ("acme", "globex")
ROLES = ("admin", "developer", "inference")


def scaled(seconds: float) -> float:
    return seconds * SCALE


@dataclass
class Stack:
    env: dict[str, str]
    admin_key: str
    keys: dict[tuple[str, str], str] = field(default_factory=dict)  # (tenant, role) -> API key

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.env['LLMP_GATEWAY_PORT']}"

    @property
    def state_dir(self) -> Path:
        return Path(self.env["LLMP_STATE_DIR"])

    def llmp(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "cli.main", *args], env=self.env, capture_output=True,
                              text=True, timeout=timeout)

    def client(self, key: str | None = None) -> Client:
        return Client(self.url, self.admin_key if key is None else key)

    def http(self, method: str, path: str, *, key: str | None = None, timeout: float = 30, **kwargs
             ) -> requests.Response:
        """A raw request (any body, any header), authenticated as `key` (default the admin)."""
        headers = dict(kwargs.pop("headers", None) or {})
        key = self.admin_key if key is None else key
        if key:
            headers.setdefault("Authorization", f"Bearer {key}")
        return requests.request(method, self.url + path, headers=headers, timeout=timeout, **kwargs)

    def record(self, name: str) -> dict:
        """`name`'s entry in stack.json (mode, pid, ports, log, detail)."""
        state = json.loads((self.state_dir / "stack.json").read_text())
        return state["components"][name]

    def resolved_env(self) -> dict[str, str]:
        """The LLMP_* settings `up` resolved (e.g. the embedded PostgreSQL's URL)."""
        return json.loads((self.state_dir / "stack.json").read_text())["env"]

    def restore(self) -> None:
        """Start whatever a test stopped (`up` starts only what is not healthy) and wait until ready."""
        up = self.llmp("up")
        assert up.returncode == 0, f"llmp up (restore) failed:\n{up.stdout}\n{up.stderr}"
        wait_ready(self, 60)


@pytest.fixture(scope="session")
def scale() -> float:
    """LLMP_RELIABILITY_SCALE: 1 in CI; durations and example counts grow with it."""
    return SCALE


def wait_ready(stack: Stack, timeout: float) -> requests.Response:
    deadline = time.monotonic() + timeout
    while True:
        try:
            response = stack.http("GET", "/v1/status", timeout=5)  # every backend, not just the gateway
            if response.status_code == 200:
                return response
        except requests.RequestException:
            response = None
        if time.monotonic() > deadline:
            detail = response.text if response is not None else "unreachable"
            raise AssertionError(f"stack not ready within {timeout}s: {detail}")
        time.sleep(0.5)


def _make_keys(stack: Stack) -> None:
    for tenant in TENANTS:
        for role in ROLES:
            created = stack.client().call("POST", "/v1/api-keys",
                                          {"tenant": tenant, "role": role, "name": f"rel-{tenant}-{role}",
                                           "rate_limit": 100000})
            stack.keys[(tenant, role)] = created["key"]


@pytest.fixture(scope="session")
def stack(tmp_path_factory, claim_broker):
    if REUSE:
        state = json.loads((Path(REUSE) / "stack.json").read_text())
        env = {key: value for key, value in os.environ.items() if not key.startswith("LLMP_")}
        env.update(state["env"])
        running = Stack(env, env.get("LLMP_ADMIN_KEY") or (Path(REUSE) / "admin.key").read_text().strip())
        _make_keys(running)
        yield running
        return
    admin_key = f"llmp_rel_{uuid.uuid4().hex}"
    env = {key: value for key, value in os.environ.items() if not key.startswith("LLMP_")}
    env.update({
        "LLMP_STATE_DIR": str(tmp_path_factory.mktemp("llmp-reliability")),
        # A closed port: `up` starts the embedded PostgreSQL there, which the suite may stop and restart.
        "LLMP_DATABASE_URL": f"postgresql://postgres@127.0.0.1:{servers.free_port()}/llmp",
        "LLMP_BROKER_URL": claim_broker("reliability-stack"),
        "LLMP_S3_ENDPOINT": f"127.0.0.1:{servers.free_port()}",
        "LLMP_S3_ACCESS_KEY": f"rel-{uuid.uuid4().hex[:8]}",
        "LLMP_S3_SECRET_KEY": f"rel-secret-{uuid.uuid4().hex}",
        "LLMP_TRITON_HTTP_URL": f"127.0.0.1:{servers.free_port()}",
        "LLMP_TRITON_GRPC_URL": f"127.0.0.1:{servers.free_port()}",
        "LLMP_TRITON_METRICS_PORT": str(servers.free_port()),
        "LLMP_GATEWAY_PORT": str(servers.free_port()),
        # The load test drives one tenant at the gateway's full speed: a throughput figure, not a quota's.
        "LLMP_TENANT_RATE_LIMIT": "1000000",
        # The auth tests send hundreds of unknown keys from this one address, faster than the per-address limit
        # allows (tests/integration/gateway/test_quotas.py tests that limiter): 401 is what they check, not 429.
        "LLMP_IP_RATE_LIMIT": "1000000",
        "LLMP_SERVICE_SECRET": identities.SERVICE_SECRET,  # so that tests may call a service as the gateway does
        "LLMP_ADMIN_KEY": admin_key,
        "LLMP_LOG_FORMAT": "json",
        "LLMP_SHUTDOWN_GRACE": "5",
    })
    for service in topology.GRPC_SERVICES:
        env[service.addr_env] = f"127.0.0.1:{servers.free_port()}"
    running = Stack(env, admin_key)
    up = running.llmp("up")
    try:
        assert up.returncode == 0, f"llmp up failed:\n{up.stdout}\n{up.stderr}"
        _make_keys(running)
        yield running
    finally:
        down = running.llmp("down")
        assert down.returncode == 0, f"llmp down failed:\n{down.stdout}\n{down.stderr}"
