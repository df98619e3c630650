"""Serving figures per deployed version: `GetDeploymentMetrics` over gRPC and `GET /v1/deployments/{name}/metrics`
through the real gateway, after real completions on Triton."""

from __future__ import annotations

import uuid

import grpc
import pytest
from llmp.inference.v1 import inference_pb2 as pb

from gateway.app import init_app
from services.common.config import Settings

pytestmark = pytest.mark.integration

ADMIN_KEY = "llmp_bootstrap_deployment-metrics-admin"
TENANT, MODEL = "acme", "tiny"  # what conftest publishes


async def figures(service, name: str) -> pb.GetDeploymentMetricsResponse:
    return await service.stub.GetDeploymentMetrics(pb.GetDeploymentMetricsRequest(name=name), metadata=service.metadata)


async def test_each_served_version_counts_its_own_requests_tokens_and_latency(service):
    name = f"metrics-{uuid.uuid4().hex[:8]}"  # the counters are per process: a name no other test served
    await service.deploy(name=name, stable=1, canary=(2, 50))
    before = await figures(service, name)
    assert [(v.version, v.role, v.serving, v.weight, v.requests) for v in before.versions] == [
        (1, "stable", True, 50, 0), (2, "canary", True, 50, 0)]
    assert not before.versions[0].HasField("latency_p50_s")  # no request yet: no latency, not a zero
    assert before.name == name and before.model == MODEL and before.replica and before.since.seconds > 0

    served = [await service.generate("ROMEO:", max_tokens=3, deployment=name, routing_key=f"user-{i}")
              for i in range(24)]
    stream = [message async for message in service.stream("JULIET:", max_tokens=2, deployment=name)]
    summaries = [*served, stream[-1].summary]
    after = await figures(service, name)
    by_role = {v.role: v for v in after.versions}
    assert set(by_role) == {"stable", "canary"} and len(after.versions) == 2
    for role, stats in by_role.items():
        mine = [c for c in summaries if c.canary == (role == "canary")]
        assert mine, f"no request reached the {role}"  # 25 requests at 50%: both tracks see some
        assert stats.version == (2 if role == "canary" else 1)
        assert stats.requests == len(mine) and stats.errors == 0 and stats.error_rate == 0
        assert stats.prompt_tokens == sum(c.prompt_tokens for c in mine)
        assert stats.completion_tokens == sum(c.completion_tokens for c in mine)
        assert 0 < stats.latency_mean_s and 0 < stats.latency_p50_s <= stats.latency_p99_s
        assert 0 < stats.time_to_first_token_mean_s <= stats.latency_mean_s * len(mine)
        assert stats.HasField("time_to_first_token_p99_s")


async def test_versions_no_longer_served_keep_their_figures_and_tenants_are_apart(service):
    name = f"metrics-{uuid.uuid4().hex[:8]}"
    await service.deploy(name=name, stable=1)
    for _ in range(3):
        await service.generate("O", max_tokens=1, deployment=name)
    await service.deploy(name=name, stable=2, if_match=(await service.stub.GetDeployment(
        pb.GetDeploymentRequest(name=name), metadata=service.metadata)).deployment.etag)
    await service.generate("O", max_tokens=1, deployment=name)
    shown = await figures(service, name)
    assert [(v.version, v.role, v.serving, v.weight, v.requests) for v in shown.versions] == [
        (2, "stable", True, 100, 1), (1, "stable", False, 0, 3)]

    stranger = type(service)(service.stub, service.deployments, service.address,
                             tenant=f"other-{uuid.uuid4().hex[:6]}")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stranger.stub.GetDeploymentMetrics(pb.GetDeploymentMetricsRequest(name=name), metadata=stranger.metadata)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_rest_route_shows_the_figures_with_an_etag(service, settings_env, aiohttp_client):
    name = f"metrics-{uuid.uuid4().hex[:8]}"
    await service.deploy(name=name, stable=1, canary=(2, 0))
    completion = await service.generate("ROMEO:", max_tokens=2, deployment=name)
    settings = Settings.from_env({**settings_env, "LLMP_ADMIN_KEY": ADMIN_KEY, "LLMP_INFERENCE_ADDR": service.address})
    client = await aiohttp_client(init_app(settings))
    created = await client.post("/v1/api-keys", json={"tenant": TENANT, "role": "developer", "rate_limit": 1000},
                                headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    assert created.status == 201, await created.text()
    auth = {"Authorization": f"Bearer {(await created.json())['key']}"}

    answer = await client.get(f"/v1/deployments/{name}/metrics", headers=auth)
    assert answer.status == 200, await answer.text()
    body = await answer.json()
    assert (body["name"], body["model"]) == (name, MODEL) and body["replica"] and body["since"]
    stable, canary = body["versions"]
    assert (stable["version"], stable["role"], stable["serving"], stable["weight"]) == (1, "stable", True, 100)
    assert stable["requests"] == 1 and stable["completion_tokens"] == completion.completion_tokens
    assert stable["prompt_tokens"] == completion.prompt_tokens and stable["latency_p99_s"] > 0
    assert (canary["version"], canary["role"], canary["weight"], canary["requests"]) == (2, "canary", 0, 0)
    assert canary["latency_p50_s"] is None and canary["time_to_first_token_mean_s"] is None

    etag = answer.headers["ETag"]
    again = await client.get(f"/v1/deployments/{name}/metrics", headers={**auth, "If-None-Match": etag})
    assert again.status == 304
    await service.generate("ROMEO:", max_tokens=2, deployment=name)
    changed = await client.get(f"/v1/deployments/{name}/metrics", headers={**auth, "If-None-Match": etag})
    assert changed.status == 200 and (await changed.json())["versions"][0]["requests"] == 2

    missing = await client.get("/v1/deployments/no-such-deployment/metrics", headers=auth)
    assert missing.status == 404
    openapi = await (await client.get("/openapi.json")).json()
    assert "get" in openapi["paths"]["/v1/deployments/{name}/metrics"]
