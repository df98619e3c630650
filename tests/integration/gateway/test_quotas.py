"""Issue 15, findings 4 and 5: a tenant's quotas hold across gateway replicas (two app instances sharing one
Redis and one database), whatever keys it mints; a flood of bogus keys is limited per client address before
each costs a database query, and a key found unknown is remembered as such."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest

from gateway.app import init_app
from gateway.quotas import GENERATIONS, STREAMS, TenantQuotas
from gateway.state import KEYS, QUOTAS
from services.common import errors
from services.common.config import Settings

pytestmark = pytest.mark.integration

ADMIN_KEY = "llmp_bootstrap_quota-admin"
RATE = 5  # requests/s per tenant in these tests (bursts of 10)


@pytest.fixture
def quota_env(settings_env, private_broker_url) -> dict[str, str]:
    return {**settings_env, "LLMP_ADMIN_KEY": ADMIN_KEY, "LLMP_QUOTA_REDIS_URL": private_broker_url,
            "LLMP_TENANT_RATE_LIMIT": str(RATE), "LLMP_TENANT_MAX_GENERATIONS": "1", "LLMP_IP_RATE_LIMIT": "2"}


@pytest.fixture
async def replicas(aiohttp_client, quota_env):
    """Two gateway replicas on the same database and Redis."""
    settings = Settings.from_env(quota_env)
    return [await aiohttp_client(init_app(settings)) for _ in range(2)]


async def _tenant_keys(client, tenant: str, count: int, role: str = "admin") -> list[dict[str, str]]:
    keys = []
    for _ in range(count):
        created = await client.post("/v1/api-keys", json={"tenant": tenant, "role": role, "rate_limit": 100000},
                                    headers={"Authorization": f"Bearer {ADMIN_KEY}"})
        assert created.status == 201, await created.text()
        keys.append({"Authorization": f"Bearer {(await created.json())['key']}"})
    return keys


async def test_a_tenants_request_quota_is_shared_by_every_replica_and_key(replicas):
    tenant, other = f"q{uuid.uuid4().hex[:8]}", f"q{uuid.uuid4().hex[:8]}"
    keys = await _tenant_keys(replicas[0], tenant, 4)
    bystander = (await _tenant_keys(replicas[0], other, 1))[0]
    started = time.monotonic()
    statuses: dict[int, list[int]] = {0: [], 1: []}
    refusal = None
    for attempt in range(40):  # each replica and each key in turn
        replica = attempt % 2
        response = await replicas[replica].get("/v1/api-keys", headers=keys[attempt % len(keys)])
        statuses[replica].append(response.status)
        if response.status == 429 and refusal is None:
            refusal = (response.headers.get("Retry-After"), (await response.json())["error"]["message"])
    elapsed = time.monotonic() - started
    admitted = sum(status == 200 for replica in statuses.values() for status in replica)
    # The burst (2 s worth) plus what refilled meanwhile, once, for the tenant: not once per replica or key.
    assert admitted <= 2 * RATE + RATE * elapsed + 1, (admitted, elapsed, statuses)
    assert 429 in statuses[0] and 429 in statuses[1], statuses
    assert set(statuses[0] + statuses[1]) == {200, 429}
    retry_after, message = refusal
    assert retry_after is not None and int(retry_after) >= 1
    assert "tenant request quota" in message and "LLMP_TENANT_RATE_LIMIT" in message
    # Another tenant's quota is its own.
    assert (await replicas[1].get("/v1/api-keys", headers=bystander)).status == 200


async def test_requests_finding_the_batch_spent_at_once_share_one_refill(quota_env):
    """The replica takes tenant tokens from Redis a batch at a time; requests in flight together when the batch
    runs out wait for one refill rather than each leasing a batch (of which all but one were dropped, so a
    tenant under its rate was refused: the gateway benchmark's 16 connections drew 16 batches a second)."""
    quotas = TenantQuotas(Settings.from_env({**quota_env, "LLMP_TENANT_RATE_LIMIT": "100"}))  # batches of 10
    tenant = f"q{uuid.uuid4().hex[:8]}"
    calls, take_tokens = [], quotas._take_tokens

    async def counted(**kwargs):
        calls.append(kwargs)
        return await take_tokens(**kwargs)

    quotas._take_tokens = counted
    try:
        await asyncio.gather(*(quotas.take(tenant) for _ in range(16)))
        assert len(calls) == 2, calls  # 16 requests, batches of 10: two batches, not sixteen
        assert quotas._batches[tenant].tokens == 4  # what the second batch left
        for _ in range(4):  # spent without asking Redis
            assert quotas.take_local(tenant)
        assert len(calls) == 2
        # The burst is 200: 20 were leased, so 180 more requests pass, then the tenant is refused; with the
        # old herd, 16 concurrent requests at a time drew 160 a round and refused it after about 20.
        admitted, refused, started = 0, 0, time.monotonic()
        for _ in range(30):
            outcomes = await asyncio.gather(*(quotas.take(tenant) for _ in range(10)), return_exceptions=True)
            admitted += sum(outcome is None for outcome in outcomes)
            refused += sum(isinstance(outcome, errors.RateLimited) for outcome in outcomes)
            if refused:
                break
        elapsed = time.monotonic() - started
        assert admitted >= 180, (admitted, refused)
        assert refused and admitted <= 180 + 10 + 100 * elapsed + 1, (admitted, refused, elapsed)  # + what refilled
    finally:
        await quotas.close()


async def test_a_revalidation_answered_by_the_gateway_itself_draws_on_the_tenant_quota(replicas):
    """The 304 fast path (validators remembered, no service call) spends a tenant request like any other."""
    from gateway.http import VALIDATORS

    gateway = replicas[0]
    tenant = f"q{uuid.uuid4().hex[:8]}"
    key = (await _tenant_keys(gateway, tenant, 1, role="developer"))[0]
    path = "/v1/datasets/d/versions/1"
    gateway.app[VALIDATORS].remember(tenant, path, {"ETag": '"e"', "Cache-Control": "private, max-age=60",
                                                    "Vary": "Authorization"}, 60)
    statuses = [(await gateway.get(path, headers={**key, "If-None-Match": '"e"'})).status for _ in range(4 * RATE)]
    assert statuses[0] == 304 and set(statuses) == {304, 429}, statuses
    assert statuses.count(304) <= 2 * RATE + 2, statuses  # the burst (2 s worth) and what refilled meanwhile
    refused = await gateway.get(path, headers={**key, "If-None-Match": '"e"'})
    assert refused.status == 429 and "tenant request quota" in (await refused.json())["error"]["message"]


@pytest.mark.parametrize("kind, method, path, body", [
    (GENERATIONS, "POST", "/v1/completions", {"model": "anything", "prompt": "hi", "max_tokens": 1}),
    (STREAMS, "GET", "/v1/training-jobs/00000000-0000-4000-8000-000000000000/events", None),
])
async def test_concurrent_generations_and_streams_are_counted_across_replicas(replicas, kind, method, path, body):
    tenant = f"q{uuid.uuid4().hex[:8]}"
    developer = (await _tenant_keys(replicas[0], tenant, 1, role="developer"))[0]
    holders = [replicas[1].app[QUOTAS].slot(tenant, kind) for _ in range(replicas[1].app[QUOTAS].limits[kind])]
    for holder in holders:  # every slot of the tenant taken, on the other replica
        await holder.__aenter__()
    try:
        busy = await replicas[0].request(method, path, json=body, headers=developer)
        assert busy.status == 429, await busy.text()
        assert f"concurrent {kind}" in (await busy.json())["error"]["message"]
        assert busy.headers["Retry-After"] == "1"
    finally:
        for holder in holders:
            await holder.__aexit__(None, None, None)
    freed = await replicas[0].request(method, path, json=body, headers=developer)
    assert freed.status != 429, await freed.text()  # past the quota (the object itself does not exist)


async def test_slots_are_shared_and_freed_through_redis(quota_env):
    settings = Settings.from_env({**quota_env, "LLMP_TENANT_MAX_STREAMS": "2"})
    first, second = TenantQuotas(settings), TenantQuotas(settings)
    tenant = f"q{uuid.uuid4().hex[:8]}"
    try:
        async with first.slot(tenant, "streams"), second.slot(tenant, "streams"):
            with pytest.raises(errors.RateLimited, match="2 concurrent streams"):
                async with first.slot(tenant, "streams"):
                    pass
        async with second.slot(tenant, "streams"), first.slot(tenant, "streams"):  # both released
            pass
    finally:
        await asyncio.gather(first.close(), second.close())


async def test_bogus_keys_are_limited_per_address_before_they_cost_a_query(replicas):
    gateway = replicas[0]
    real = (await _tenant_keys(gateway, f"q{uuid.uuid4().hex[:8]}", 1))[0]
    # Its first use took one of the address's tokens (its key was not yet known); now known, it takes none.
    assert (await gateway.get("/v1/api-keys", headers=real)).status == 200
    statuses = []
    for _ in range(12):
        bogus = {"Authorization": f"Bearer llmp_{uuid.uuid4().hex[:12]}_{uuid.uuid4().hex}"}
        statuses.append((await gateway.get("/v1/api-keys", headers=bogus)).status)
    assert statuses[:3] == [401] * 3  # the rest of the address's burst (2/s, bursts of 4)
    assert statuses.count(429) >= 6, statuses
    assert (await gateway.get("/v1/api-keys", headers=real)).status == 200  # a known key is not held up


async def test_a_key_found_unknown_is_not_looked_up_again(replicas):
    gateway = replicas[1]
    bogus = {"Authorization": f"Bearer llmp_{uuid.uuid4().hex[:12]}_{uuid.uuid4().hex}"}
    assert (await gateway.get("/v1/api-keys", headers=bogus)).status == 401
    keys = gateway.app[KEYS]
    database, keys.db = keys.db, None  # any lookup now would fail with a 500
    try:
        again = await gateway.get("/v1/api-keys", headers=bogus)
        assert again.status == 401, await again.text()
    finally:
        keys.db = database


async def test_a_key_revoked_through_one_replica_stops_working_on_the_other_within_the_cache_bound(
        replicas, monkeypatch):
    """Verified keys are cached per replica (`auth.CACHE_SECONDS`, the 304 path's authentication costs no
    query): the replica that revokes refuses the key at once, another within that bound, never later."""
    from gateway import auth

    monkeypatch.setattr(auth, "CACHE_SECONDS", 0.6)
    tenant = f"q{uuid.uuid4().hex[:8]}"
    created = await replicas[0].post("/v1/api-keys", json={"tenant": tenant, "role": "developer"},
                                     headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    key = await created.json()
    headers = {"Authorization": f"Bearer {key['key']}"}
    for replica in replicas:  # now cached on both
        assert (await replica.get("/v1/datasets", headers=headers)).status != 401
    revoked = await replicas[0].delete(f"/v1/api-keys/{key['id']}", headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    assert revoked.status == 204
    started = time.monotonic()
    assert (await replicas[0].get("/v1/datasets", headers=headers)).status == 401
    while (status := (await replicas[1].get("/v1/datasets", headers=headers)).status) != 401:
        assert time.monotonic() - started < auth.CACHE_SECONDS + 0.5, status  # the bound, and scheduling slack
        await asyncio.sleep(0.2)
    assert (await replicas[1].get("/v1/datasets", headers=headers)).status == 401  # remembered as unknown now
