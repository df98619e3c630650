"""Per-version Prometheus metrics, so a canary can be judged against its stable version and an operator can
see what each served version did (`GetDeploymentMetrics`, the console's deployment view).

`tenant` is a label because deployment names are per tenant: two tenants' `chat` must not add up in one
rollout's figures. The Prometheus figures are this process's: every inference replica counts what it served.

Fleet-wide figures: `FleetMetrics` adds this process's increments of the same series (requests, errors,
latency histogram, tokens) into PostgreSQL (migrations/003_version_metrics.sql) every `FLUSH_INTERVAL_S`
and at shutdown, one row per (tenant, deployment, model, version, track) and `BUCKET_S` bucket of
PostgreSQL's clock; `fleet_totals` sums a key's buckets from a point in time on. What a replica served
reaches the table at most one flush interval late (or, while PostgreSQL is away, at its next successful
flush: increments are taken from the cumulative counters, so a failed flush loses nothing).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from dataclasses import dataclass, field
from datetime import datetime

from prometheus_client import Counter, Histogram

from services.common.db import Database
from services.common.metrics import LATENCY_BUCKETS
from services.common.periodic import Periodic

log = logging.getLogger(__name__)

LABELS = ["tenant", "deployment", "model", "version", "canary"]

REQUESTS = Counter("llmp_inference_requests_total", "Generation requests by served version and outcome",
                   [*LABELS, "outcome"])
LATENCY = Histogram("llmp_inference_request_seconds", "Generation latency by served version", LABELS,
                    buckets=LATENCY_BUCKETS)
FIRST_TOKEN = Histogram("llmp_inference_first_token_seconds", "Time to first token by served version", LABELS,
                        buckets=LATENCY_BUCKETS)
TOKENS = Counter("llmp_inference_tokens_total", "Tokens by served version and kind (prompt, completion)",
                 [*LABELS, "kind"])

STARTED_AT = time.time()  # when this process's counters started (they start from zero with the process)


def replica() -> str:
    """Which process counted the figures: "<host>:<pid>"."""
    return f"{socket.gethostname()}:{os.getpid()}"


def histogram_quantile(q: float, buckets: tuple[tuple[float, float], ...]) -> float | None:
    """Prometheus' histogram_quantile: linear interpolation inside the bucket holding rank q·total."""
    ordered = sorted(buckets)
    if not ordered or ordered[-1][1] <= 0:
        return None
    rank = q * ordered[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in ordered:
        if count >= rank:
            if bound == float("inf"):  # in the open top bucket: the highest finite bound is all we know
                return lower_bound
            if count == lower_count:
                return bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (count - lower_count)
        lower_bound, lower_count = bound, count
    return lower_bound


# -- this process's counters ---------------------------------------------------------------------

LATENCY_BOUNDS = (*(float(bound) for bound in LATENCY_BUCKETS), float("inf"))  # the histograms' layout, the table's too

Key = tuple[str, str, str, int, bool]  # (tenant, deployment, model, version, canary)


@dataclass
class Totals:
    """Counts of one key: a process's cumulative counters, an increment of them, or a fleet window's sums."""

    requests: int = 0
    errors: int = 0
    latency_sum: float = 0.0  # seconds
    latency_buckets: list[int] = field(default_factory=lambda: [0] * len(LATENCY_BOUNDS))  # cumulative
    prompt_tokens: int = 0
    completion_tokens: int = 0
    # Time to first token: read only when asked for (`deployment_stats`); the fleet table keeps none.
    first_token_sum: float = 0.0  # seconds
    first_token_buckets: list[int] = field(default_factory=lambda: [0] * len(LATENCY_BOUNDS))  # cumulative

    def minus(self, earlier: "Totals") -> "Totals":
        return Totals(self.requests - earlier.requests, self.errors - earlier.errors,
                      self.latency_sum - earlier.latency_sum, _minus(self.latency_buckets, earlier.latency_buckets),
                      self.prompt_tokens - earlier.prompt_tokens, self.completion_tokens - earlier.completion_tokens,
                      self.first_token_sum - earlier.first_token_sum,
                      _minus(self.first_token_buckets, earlier.first_token_buckets))

    def is_zero(self) -> bool:
        return not (self.requests or self.errors or self.latency_sum or self.prompt_tokens
                    or self.completion_tokens or any(self.latency_buckets) or self.first_token_sum
                    or any(self.first_token_buckets))


def _minus(buckets: list[int], earlier: list[int]) -> list[int]:
    return [now - before for now, before in zip(buckets, earlier, strict=True)]


def process_totals(requests: Counter = REQUESTS, latency: Histogram = LATENCY, tokens: Counter = TOKENS,
                   first_token: Histogram | None = None) -> dict[Key, Totals]:
    """The cumulative counters of every key the given series (this process's by default) have counted: the one
    reader of the Prometheus samples, for the fleet flusher, the canary's `ProcessMetrics` and `deployment_stats`."""
    found: dict[Key, Totals] = {}

    def totals(labels: dict[str, str]) -> Totals:
        key = (labels["tenant"], labels["deployment"], labels["model"], int(labels["version"]),
               labels["canary"] == "true")
        return found.setdefault(key, Totals())

    for family in requests.collect():
        for sample in family.samples:
            if sample.name.endswith("_total"):
                entry = totals(sample.labels)
                entry.requests += round(sample.value)
                entry.errors += round(sample.value) if sample.labels.get("outcome") == "error" else 0
    for histogram, name in ((latency, "latency"), (first_token, "first_token")):
        for family in histogram.collect() if histogram is not None else ():
            for sample in family.samples:
                if sample.name.endswith("_sum"):
                    setattr(totals(sample.labels), f"{name}_sum", sample.value)
                elif sample.name.endswith("_bucket"):
                    bound = float(sample.labels["le"])
                    if bound not in LATENCY_BOUNDS:
                        raise ValueError(f"{name} bucket {bound} is not one of metrics.LATENCY_BOUNDS")
                    getattr(totals(sample.labels), f"{name}_buckets")[LATENCY_BOUNDS.index(bound)] = round(sample.value)
    for family in tokens.collect():
        for sample in family.samples:
            if sample.name.endswith("_total"):
                entry = totals(sample.labels)
                if sample.labels.get("kind") == "prompt":
                    entry.prompt_tokens += round(sample.value)
                elif sample.labels.get("kind") == "completion":
                    entry.completion_tokens += round(sample.value)
    return found


@dataclass
class Timings:
    """One histogram's series for one label set: count, sum and cumulative buckets (upper bound, count)."""

    count: float = 0.0
    total: float = 0.0  # seconds
    buckets: list[tuple[float, float]] = field(default_factory=list)

    def mean(self) -> float | None:
        return self.total / self.count if self.count > 0 else None

    def quantile(self, q: float) -> float | None:
        return histogram_quantile(q, tuple(self.buckets)) if self.count > 0 else None


@dataclass
class VersionStats:
    """What one (model, version, track) of a deployment served in this process."""

    model: str
    version: int
    canary: bool
    requests: float = 0.0
    errors: float = 0.0
    latency: Timings = field(default_factory=Timings)
    first_token: Timings = field(default_factory=Timings)
    prompt_tokens: float = 0.0
    completion_tokens: float = 0.0

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests > 0 else 0.0


def _timings(total: float, buckets: list[int]) -> Timings:
    """One histogram of a `Totals` (its count is the +Inf bucket's)."""
    pairs = zip(LATENCY_BOUNDS, buckets, strict=True)
    return Timings(float(buckets[-1]), total, [(bound, float(count)) for bound, count in pairs])


def deployment_stats(tenant: str, deployment: str) -> dict[tuple[str, int, bool], VersionStats]:
    """Every (model, version, canary track) of a tenant's deployment this process has served, with its figures."""
    return {(model, version, canary): VersionStats(model, version, canary, totals.requests, totals.errors,
                                                   _timings(totals.latency_sum, totals.latency_buckets),
                                                   _timings(totals.first_token_sum, totals.first_token_buckets),
                                                   totals.prompt_tokens, totals.completion_tokens)
            for (t, d, model, version, canary), totals in process_totals(first_token=FIRST_TOKEN).items()
            if (t, d) == (tenant, deployment)}


# -- fleet-wide figures in PostgreSQL -----------------------------------------------------------------

FLUSH_INTERVAL_S = 2.0  # how often a process adds its increments into PostgreSQL (the figures' lag)
BUCKET_S = 10  # one row per key per bucket of this many seconds
RETENTION_S = 6 * 3600  # buckets older than this are deleted
PRUNE_EVERY_S = 60.0  # how often a flusher deletes old buckets
_ORIGIN = "TIMESTAMPTZ '2000-01-01 00:00:00+00'"  # bucket boundaries: date_bin's origin

_UPSERT = f"""
INSERT INTO inference_version_metrics AS m
    (tenant, deployment, model, version, canary, bucket_start, requests, errors, latency_sum, latency_buckets,
     prompt_tokens, completion_tokens)
VALUES (%s, %s, %s, %s, %s, date_bin(%s::interval, now(), {_ORIGIN}), %s, %s, %s, %s, %s, %s)
ON CONFLICT (tenant, deployment, model, version, canary, bucket_start) DO UPDATE SET
    requests = m.requests + EXCLUDED.requests,
    errors = m.errors + EXCLUDED.errors,
    latency_sum = m.latency_sum + EXCLUDED.latency_sum,
    latency_buckets = ARRAY(SELECT coalesce(a, 0) + coalesce(b, 0)
                            FROM unnest(m.latency_buckets, EXCLUDED.latency_buckets) WITH ORDINALITY AS u(a, b, i)
                            ORDER BY i),
    prompt_tokens = m.prompt_tokens + EXCLUDED.prompt_tokens,
    completion_tokens = m.completion_tokens + EXCLUDED.completion_tokens"""


class FleetMetrics:
    """Adds this process's per-key increments into `inference_version_metrics` every `interval_s`.

    The increments are differences of the Prometheus series' cumulative counters (this process's by
    default) since the last successful flush; the counts before the flusher was made are not added
    (in the service it is made before the first request). One transaction per flush, keys in sorted
    order, so concurrent flushers of several replicas never deadlock on each other's rows.
    """

    def __init__(self, db: Database, *, requests: Counter = REQUESTS, latency: Histogram = LATENCY,
                 tokens: Counter = TOKENS, interval_s: float = FLUSH_INTERVAL_S, bucket_s: int = BUCKET_S,
                 retention_s: float = RETENTION_S) -> None:
        self.db = db
        self.series = (requests, latency, tokens)
        self.interval_s = interval_s
        self.bucket_s = bucket_s
        self.retention_s = retention_s
        self._flushed = process_totals(*self.series)
        self._lock = asyncio.Lock()
        self._pruned_at = 0.0
        self._loop = Periodic("metrics flush", interval_s, self._round)

    async def flush(self) -> int:
        """Add what was counted since the last successful flush; returns the number of keys written."""
        async with self._lock:
            counted = process_totals(*self.series)
            rows = []
            for key in sorted(counted):
                delta = counted[key].minus(self._flushed.get(key, Totals()))
                if not delta.is_zero():
                    rows.append((*key, f"{self.bucket_s} seconds", delta.requests, delta.errors, delta.latency_sum,
                                 delta.latency_buckets, delta.prompt_tokens, delta.completion_tokens))
            if rows:
                async with self.db.transaction() as conn:
                    async with conn.cursor() as cursor:
                        await cursor.executemany(_UPSERT, rows)
            self._flushed = counted
            return len(rows)

    async def prune(self) -> int:
        """Delete buckets older than the retention; returns the number of rows deleted."""
        async with self.db.pool.connection() as conn:
            cursor = await conn.execute(
                "DELETE FROM inference_version_metrics WHERE bucket_start < now() - %s::interval",
                (f"{self.retention_s} seconds",))
            return cursor.rowcount

    def start(self) -> None:
        self._loop.start()

    async def close(self) -> None:
        """Stop the loop, then flush what is left (call after the server stopped serving)."""
        await self._loop.close()
        try:
            await self.flush()
        except Exception:
            log.exception("final metrics flush failed")

    async def _round(self) -> None:
        await self.flush()  # when it fails (PostgreSQL away), the next flush carries these increments too
        if time.monotonic() - self._pruned_at >= PRUNE_EVERY_S:
            self._pruned_at = time.monotonic()
            await self.prune()


_WINDOW = f"""
WITH window_rows AS (
    SELECT * FROM inference_version_metrics
    WHERE tenant = %s AND deployment = %s AND model = %s AND version = %s AND canary = %s
      AND bucket_start >= date_bin(%s::interval, %s::timestamptz, {_ORIGIN})
)
SELECT coalesce(sum(requests), 0)::bigint AS requests, coalesce(sum(errors), 0)::bigint AS errors,
       coalesce(sum(latency_sum), 0)::float8 AS latency_sum,
       coalesce(sum(prompt_tokens), 0)::bigint AS prompt_tokens,
       coalesce(sum(completion_tokens), 0)::bigint AS completion_tokens,
       (SELECT array_agg(total ORDER BY i) FROM (
            SELECT i, sum(v)::bigint AS total FROM window_rows, unnest(latency_buckets) WITH ORDINALITY AS u(v, i)
            GROUP BY i) AS per_bound) AS latency_buckets
FROM window_rows"""


async def fleet_totals(db: Database, key: Key, since: datetime, bucket_s: int = BUCKET_S) -> Totals:
    """What every process flushed for `key` into the buckets from the one holding `since` on."""
    async with db.pool.connection() as conn:
        row = await (await conn.execute(_WINDOW, (*key, f"{bucket_s} seconds", since))).fetchone()
    buckets = list(row["latency_buckets"] or ())
    buckets += [buckets[-1] if buckets else 0] * (len(LATENCY_BOUNDS) - len(buckets))
    return Totals(row["requests"], row["errors"], row["latency_sum"], buckets[:len(LATENCY_BOUNDS)],
                  row["prompt_tokens"], row["completion_tokens"])
