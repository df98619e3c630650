"""The gateway app (aiohttp_client) in front of the in-process dataset service, real PostgreSQL and SeaweedFS.

Keys for two tenants in every role; a READY dataset version owned by tenant `alpha`. The other services
are not running, so their routes answer 503 once a request gets past authentication — which is what the
role checks below rely on: a 401/403/422 comes from the gateway itself, before any service call.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import pytest

from gateway.app import init_app
from services.common import topology
from services.common.config import Settings
from services.dataset import server as dataset_server

ADMIN_KEY = "llmp_bootstrap_gateway-contract-admin"
CORPUS = "\n\n".join(f"Paragraph {i}: gateways answer conditional requests without asking anyone." for i in range(60))


@dataclass
class Gateway:
    client: object  # aiohttp TestClient
    keys: dict[tuple[str, str], str]  # (tenant, role) -> API key
    dataset: str  # path of alpha's READY dataset version
    etag: str
    tenants: dict[str, str]  # "alpha"/"beta" -> this test's tenant name

    def auth(self, tenant: str, role: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[(tenant, role)]}"}


async def _no_lineage(tenant: str, name: str, version: int) -> list[str]:
    return []


@pytest.fixture
async def gateway(aiohttp_client, settings_env) -> Gateway:
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    settings = Settings.from_env({**settings_env, "LLMP_ADMIN_KEY": ADMIN_KEY})
    service = await dataset_server.build_app(settings, models_using=_no_lineage)
    await service.start(settings.listen_addr(topology.DATASET))
    exporter = InMemorySpanExporter()
    client = await aiohttp_client(init_app(settings, span_exporter=exporter))
    client.spans = exporter
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    suffix = uuid.uuid4().hex[:6]
    keys = {}
    for tenant in (f"alpha{suffix}", f"beta{suffix}"):
        for role in ("admin", "developer", "inference"):
            created = await client.post("/v1/api-keys", json={"tenant": tenant, "role": role, "rate_limit": 1000},
                                        headers=admin)
            assert created.status == 201, await created.text()
            keys[(tenant.removesuffix(suffix), role)] = (await created.json())["key"]
    developer = {"Authorization": f"Bearer {keys[('alpha', 'developer')]}"}
    made = await client.post("/v1/datasets?name=contract&tokenizer=char&wait=true", data=CORPUS.encode(),
                             headers=developer)
    assert made.status == 201, await made.text()
    path = made.headers["Location"]
    got = await client.get(path, headers=developer)
    assert got.status == 200
    tenants = {"alpha": f"alpha{suffix}", "beta": f"beta{suffix}"}
    yield Gateway(client, keys, path, got.headers["ETag"], tenants)
    await service.stop()
