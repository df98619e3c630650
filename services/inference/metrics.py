"""Per-version Prometheus metrics, so a canary can be judged against its stable version and an operator can
see what each served version did (`GetDeploymentMetrics`, the console's deployment view).

`tenant` is a label because deployment names are per tenant: two tenants' `chat` must not add up in one
rollout's figures. The figures are this process's: every inference replica counts what it served.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from prometheus_client import Counter, Histogram, Metric

from services.common.metrics import LATENCY_BUCKETS

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


def _series(families: Iterable[Metric], tenant: str, deployment: str):
    for family in families:
        for sample in family.samples:
            labels = sample.labels
            if labels.get("tenant") == tenant and labels.get("deployment") == deployment:
                yield sample, (labels["model"], int(labels["version"]), labels["canary"] == "true")


def _timings(histogram: Histogram, tenant: str, deployment: str, stats, attribute: str) -> None:
    for sample, key in _series(histogram.collect(), tenant, deployment):
        timings: Timings = getattr(stats(key), attribute)
        if sample.name.endswith("_count"):
            timings.count = sample.value
        elif sample.name.endswith("_sum"):
            timings.total = sample.value
        elif sample.name.endswith("_bucket"):
            timings.buckets.append((float(sample.labels["le"]), sample.value))


def deployment_stats(tenant: str, deployment: str) -> dict[tuple[str, int, bool], VersionStats]:
    """Every (model, version, canary track) of a tenant's deployment this process has served, with its figures."""
    found: dict[tuple[str, int, bool], VersionStats] = {}

    def stats(key: tuple[str, int, bool]) -> VersionStats:
        if key not in found:
            found[key] = VersionStats(*key)
        return found[key]

    for sample, key in _series(REQUESTS.collect(), tenant, deployment):
        if sample.name.endswith("_total"):
            entry = stats(key)
            entry.requests += sample.value
            if sample.labels.get("outcome") == "error":
                entry.errors += sample.value
    _timings(LATENCY, tenant, deployment, stats, "latency")
    _timings(FIRST_TOKEN, tenant, deployment, stats, "first_token")
    for sample, key in _series(TOKENS.collect(), tenant, deployment):
        if sample.name.endswith("_total"):
            entry = stats(key)
            if sample.labels.get("kind") == "prompt":
                entry.prompt_tokens += sample.value
            elif sample.labels.get("kind") == "completion":
                entry.completion_tokens += sample.value
    for entry in found.values():
        entry.latency.buckets.sort()
        entry.first_token.buckets.sort()
    return found
