"""Issue 15, finding 5: a tenant's training nodes are bounded, through the gateway and the real training
service; the refusal is 429 with Retry-After naming the quota and its setting, and another tenant is not
affected."""

from __future__ import annotations

import pytest

from services.common import topology
from services.common.config import Settings
from services.training import server as training_server

pytestmark = pytest.mark.integration


def job(dataset: str) -> dict:
    name, version = dataset.rsplit("/", 3)[1], int(dataset.rsplit("/", 1)[1])
    return {"dataset": {"name": name, "version": version},
            "model": {"family": "gpt2", "n_layer": 1, "n_head": 1, "n_embd": 8, "block_size": 8},
            "hyperparameters": {"max_steps": 1, "warmup_steps": 0},
            "distributed": {"mode": "ddp", "nnodes": 1, "nproc_per_node": 1}}


async def test_training_nodes_past_the_tenants_quota_are_429_naming_it(gateway, settings_env):
    settings = Settings.from_env({**settings_env, "LLMP_TENANT_MAX_TRAINING_NODES": "1"})
    training = await training_server.build(settings)
    await training.start(settings.listen_addr(topology.TRAINING))
    try:
        developer = gateway.auth("alpha", "developer")
        first = await gateway.client.post("/v1/training-jobs", headers=developer, json=job(gateway.dataset))
        assert first.status == 202, await first.text()
        refused = await gateway.client.post("/v1/training-jobs", headers=developer, json=job(gateway.dataset))
        assert refused.status == 429, await refused.text()
        assert int(refused.headers["Retry-After"]) >= 1
        error = (await refused.json())["error"]
        assert error["type"] == "rate_limited"
        assert "training nodes quota" in error["message"] and "LLMP_TENANT_MAX_TRAINING_NODES=1" in error["message"]
        listed = await gateway.client.get("/v1/training-jobs", headers=developer)
        assert len((await listed.json())["jobs"]) == 1  # the refused job was not created
        # Once the tenant's job ends, its nodes are free again.
        cancelled = await gateway.client.delete(f"/v1/training-jobs/{(await first.json())['id']}", headers=developer)
        assert cancelled.status in (200, 202), await cancelled.text()
        again = await gateway.client.post("/v1/training-jobs", headers=developer, json=job(gateway.dataset))
        assert again.status == 202, await again.text()
    finally:
        await training.stop()
