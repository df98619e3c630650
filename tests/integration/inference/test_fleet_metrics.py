"""Fleet-wide per-version figures in a real PostgreSQL: several processes' flushes add up, and the canary
controller judges a rollout from what every replica served, not only its own process.

A "process" here is a `FleetMetrics` flusher over its own Prometheus series (its own registry), as each
inference replica has its own; they write to the same database, as replicas do.
"""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram
from psycopg_pool import PoolClosed

from services.common.db import Database
from services.common.metrics import LATENCY_BUCKETS
from services.inference import metrics, server
from services.inference.canary import DatabaseMetrics, RolloutPolicy, TrackStats

from .conftest import MODEL, TENANT

pytestmark = pytest.mark.integration


class Replica:
    """One inference process's series (the same names, labels and buckets as services/inference/metrics.py)."""

    def __init__(self) -> None:
        registry = CollectorRegistry()
        self.requests = Counter("llmp_inference_requests_total", "requests", [*metrics.LABELS, "outcome"],
                                registry=registry)
        self.latency = Histogram("llmp_inference_request_seconds", "latency", metrics.LABELS, buckets=LATENCY_BUCKETS,
                                 registry=registry)
        self.tokens = Counter("llmp_inference_tokens_total", "tokens", [*metrics.LABELS, "kind"], registry=registry)

    def flusher(self, db: Database, **options) -> metrics.FleetMetrics:
        return metrics.FleetMetrics(db, requests=self.requests, latency=self.latency, tokens=self.tokens, **options)

    def serve(self, deployment: str, version: int, canary: bool, n: int, *, seconds: float, error: bool = False,
              tenant: str = TENANT, completion_tokens: int = 1) -> None:
        """`n` finished requests, as the servicer counts them."""
        labels = (tenant, deployment, MODEL, str(version), "true" if canary else "false")
        for _ in range(n):
            self.requests.labels(*labels, "error" if error else "ok").inc()
            self.latency.labels(*labels).observe(seconds)
            self.tokens.labels(*labels, "prompt").inc(3)
            self.tokens.labels(*labels, "completion").inc(completion_tokens)


@pytest.fixture
async def db(database_url):
    database = await Database.connect(database_url, component="inference", migrations_dir=server.MIGRATIONS)
    yield database
    await database.close()


async def db_now(db: Database):
    async with db.pool.connection() as conn:
        return (await (await conn.execute("SELECT now() AS now")).fetchone())["now"]


def count_at(stats: TrackStats, bound: float) -> float:
    return dict(stats.buckets)[bound]


async def test_two_replicas_flushes_add_up_per_key(db):
    a, b = Replica(), Replica()
    a.serve("fleet-sum", 2, True, 7, seconds=0.5)  # counted before the flusher exists: not the fleet's to add
    flush_a, flush_b = a.flusher(db), b.flusher(db)
    since = await db_now(db)
    source = DatabaseMetrics(db)

    a.serve("fleet-sum", 2, True, 30, seconds=0.004)
    a.serve("fleet-sum", 2, True, 5, seconds=0.2, error=True)
    b.serve("fleet-sum", 2, True, 20, seconds=0.03, completion_tokens=4)
    b.serve("fleet-sum", 1, False, 40, seconds=0.004)
    b.serve("fleet-sum", 2, True, 9, seconds=0.004, tenant="globex")  # another tenant's same-named deployment
    assert await flush_a.flush() == 1 and await flush_b.flush() == 3

    canary = await source.read(TENANT, "fleet-sum", MODEL, 2, True, since)
    assert (canary.requests, canary.errors) == (55, 5)
    assert canary.latency_sum == pytest.approx(30 * 0.004 + 5 * 0.2 + 20 * 0.03)
    assert [bound for bound, _ in canary.buckets] == list(metrics.LATENCY_BOUNDS)
    assert (count_at(canary, 0.005), count_at(canary, 0.05), count_at(canary, 0.25)) == (30, 50, 55)
    assert count_at(canary, float("inf")) == 55 and canary.error_rate == pytest.approx(5 / 55)
    stable = await source.read(TENANT, "fleet-sum", MODEL, 1, False, since)
    assert (stable.requests, stable.errors, count_at(stable, 0.001)) == (40, 0, 0)
    assert (await source.read("globex", "fleet-sum", MODEL, 2, True, since)).requests == 9
    assert (await source.read(TENANT, "fleet-sum", MODEL, 2, False, since)).requests == 0  # the other track

    # Tokens are summed too (the row of the current bucket holds both processes' increments).
    async with db.pool.connection() as conn:
        rows = await (await conn.execute(
            "SELECT sum(requests) AS requests, sum(prompt_tokens) AS prompt, sum(completion_tokens) AS completion "
            "FROM inference_version_metrics WHERE tenant = %s AND deployment = 'fleet-sum' AND canary",
            (TENANT,))).fetchone()
    assert (rows["requests"], rows["prompt"], rows["completion"]) == (55, 55 * 3, 35 + 20 * 4)

    # Nothing new: a flush writes nothing. More traffic: a read over the same window grows by exactly that.
    assert await flush_a.flush() == 0
    b.serve("fleet-sum", 2, True, 4, seconds=0.004, error=True)
    await flush_b.flush()
    later = await source.read(TENANT, "fleet-sum", MODEL, 2, True, since)
    window = later.minus(canary)
    assert (window.requests, window.errors, count_at(window, 0.005)) == (4, 4, 4)
    # A window that begins after every bucket so far is empty.
    after = await source.read(TENANT, "fleet-sum", MODEL, 2, True, since + timedelta(seconds=metrics.BUCKET_S * 2))
    assert after.requests == 0 and after.latency("p95") is None


async def test_concurrent_flushes_of_many_keys_lose_nothing(db):
    """Replicas flushing the same keys at the same time: every increment lands once, no deadlock."""
    replicas = [Replica() for _ in range(3)]
    flushers = [replica.flusher(db) for replica in replicas]
    since = await db_now(db)
    for round_ in range(6):
        for i, replica in enumerate(replicas):
            for version in range(1, 9):  # the replicas' keys in different orders of first use
                replica.serve("fleet-race", (version + i) % 8 + 1, round_ % 2 == 0, 2, seconds=0.01)
        await asyncio.gather(*(flusher.flush() for flusher in flushers))
    source = DatabaseMetrics(db)
    for version in range(1, 9):
        canary = await source.read(TENANT, "fleet-race", MODEL, version, True, since)
        stable = await source.read(TENANT, "fleet-race", MODEL, version, False, since)
        assert (canary.requests, stable.requests) == (3 * 3 * 2, 3 * 3 * 2), version
        assert count_at(canary, 0.01) == canary.requests


async def test_a_failed_flush_is_carried_by_the_next_and_old_buckets_are_pruned(db, database_url):
    replica = Replica()
    broken = await Database.connect(database_url, component="inference")
    flusher = replica.flusher(broken, retention_s=3600)
    await broken.close()  # PostgreSQL unreachable for this flusher
    since = await db_now(db)
    replica.serve("fleet-retry", 2, True, 6, seconds=0.01, error=True)
    with pytest.raises(PoolClosed):
        await flusher.flush()
    flusher.db = db  # reachable again
    replica.serve("fleet-retry", 2, True, 1, seconds=0.01)
    assert await flusher.flush() == 1
    source = DatabaseMetrics(db)
    stats = await source.read(TENANT, "fleet-retry", MODEL, 2, True, since)
    assert (stats.requests, stats.errors) == (7, 6)

    async with db.pool.connection() as conn:  # a bucket from two hours ago, beyond the retention
        await conn.execute(
            "INSERT INTO inference_version_metrics (tenant, deployment, model, version, canary, bucket_start, "
            "requests, errors, latency_buckets) VALUES (%s, 'fleet-retry', %s, 2, true, now() - interval '2 hours', "
            "100, 0, %s)", (TENANT, MODEL, [100] * len(metrics.LATENCY_BOUNDS)))
    long_ago = since - timedelta(hours=3)
    assert (await source.read(TENANT, "fleet-retry", MODEL, 2, True, long_ago)).requests == 107
    assert await flusher.prune() >= 1
    pruned = await source.read(TENANT, "fleet-retry", MODEL, 2, True, long_ago)
    assert pruned.requests == 7 and pruned.went_back_from(TrackStats(107.0))  # the controller restarts its step


@pytest.mark.slow
async def test_the_controller_rolls_back_on_errors_another_replica_served(service, database_url):
    """The canary pod's failures reach the controller of a process that served no canary request."""
    await service.deploy("fleet-judged", stable=1)
    policy = RolloutPolicy(interval_s=60.0, min_requests=10, max_error_rate_delta=0.1)
    await service.canary.begin(TENANT, "fleet-judged", 2, policy, wait=True)
    db = await Database.connect(database_url, component="inference")
    try:
        canary_pod = Replica()
        flusher = canary_pod.flusher(db)
        canary_pod.serve("fleet-judged", 2, True, 12, seconds=0.01, error=True)
        await flusher.flush()
        clock = time.monotonic()
        while (status := await service.canary.status(TENANT, "fleet-judged"))["state"] == "PROGRESSING":
            assert time.monotonic() - clock < 15, status
            await asyncio.sleep(0.2)
    finally:
        await db.close()
    assert status["state"] == "ROLLED_BACK" and "error rate 100.0%" in status["reason"], status
    observed = status["events"][-1]["observed"]
    assert observed["canary"]["requests"] == 12 and observed["stable"]["requests"] == 0
    shown = await service.get("fleet-judged")
    assert (shown.stable_version, shown.canary.version, shown.canary.weight) == (1, 2, 0)
