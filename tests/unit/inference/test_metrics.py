"""services.inference.metrics: the figures of one deployment (`GetDeploymentMetrics`) are this process's series as
read by `process_totals`, the reader the fleet flusher and the canary's ProcessMetrics share."""

from __future__ import annotations

import uuid

import pytest

from services.inference import metrics


def serve(labels: tuple[str, ...], latency_s: float, first_token_s: float | None, outcome: str = "ok") -> None:
    """What the servicer records for one request."""
    metrics.REQUESTS.labels(*labels, outcome).inc()
    metrics.LATENCY.labels(*labels).observe(latency_s)
    if first_token_s is not None:
        metrics.FIRST_TOKEN.labels(*labels).observe(first_token_s)
    metrics.TOKENS.labels(*labels, "prompt").inc(10)
    metrics.TOKENS.labels(*labels, "completion").inc(4)


def test_deployment_stats_of_each_served_version():
    name = f"stats-{uuid.uuid4().hex[:8]}"  # the series are the process's: a name no other test served
    stable, canary = ("acme", name, "tiny", "1", "false"), ("acme", name, "tiny", "2", "true")
    for _ in range(3):
        serve(stable, 0.004, 0.002)
    serve(canary, 0.2, 0.05)
    serve(canary, 0.3, None, outcome="error")  # failed before its first token
    serve(("globex", name, "tiny", "1", "false"), 5.0, 1.0)  # another tenant's deployment of the same name

    found = metrics.deployment_stats("acme", name)
    assert set(found) == {("tiny", 1, False), ("tiny", 2, True)}
    one, two = found[("tiny", 1, False)], found[("tiny", 2, True)]
    assert (one.requests, one.errors, one.prompt_tokens, one.completion_tokens) == (3, 0, 30, 12)
    assert (two.requests, two.errors, two.error_rate) == (2, 1, 0.5)
    assert one.latency.count == 3 and one.latency.mean() == pytest.approx(0.004)
    assert two.latency.mean() == pytest.approx(0.25) and 0.1 < two.latency.quantile(0.5) <= 0.25
    assert two.first_token.count == 1 and two.first_token.mean() == pytest.approx(0.05)  # one got a first token
    assert one.first_token.quantile(0.99) <= 0.005


def test_deployment_stats_and_process_totals_agree():
    name = f"stats-{uuid.uuid4().hex[:8]}"
    labels = ("acme", name, "tiny", "3", "false")
    serve(labels, 0.02, 0.01)
    serve(labels, 0.03, 0.01, outcome="error")
    totals = metrics.process_totals()[("acme", name, "tiny", 3, False)]
    stats = metrics.deployment_stats("acme", name)[("tiny", 3, False)]
    assert (stats.requests, stats.errors, stats.latency.total) == (totals.requests, totals.errors, totals.latency_sum)
    assert [count for _, count in stats.latency.buckets] == totals.latency_buckets
    assert totals.first_token_sum == 0 and not any(totals.first_token_buckets)  # not asked for: the fleet keeps none
    with_first_token = metrics.process_totals(first_token=metrics.FIRST_TOKEN)[("acme", name, "tiny", 3, False)]
    assert with_first_token.first_token_sum == pytest.approx(0.02) and with_first_token.first_token_buckets[-1] == 2
