"""The canary controller's pure parts: the policy, the step verdict, metrics arithmetic."""

from __future__ import annotations

import pytest

from services.common.errors import ValidationFailed
from services.inference import metrics
from services.inference.canary import (
    ProcessMetrics,
    RolloutPolicy,
    TrackStats,
    evaluate,
    histogram_quantile,
)

INF = float("inf")


def stats(requests: int, errors: int = 0, latency_s: float = 0.01) -> TrackStats:
    """`requests` requests of `latency_s` each, `errors` of them failed."""
    bounds = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, INF)
    return TrackStats(requests, errors, requests * latency_s,
                      tuple((bound, float(requests if latency_s <= bound else 0)) for bound in bounds))


# -- policy -----------------------------------------------------------------------------------------


def test_policy_defaults_and_json_round_trip():
    policy = RolloutPolicy.from_dict({"steps": [10, 100], "interval_s": 5, "latency_statistic": "mean"})
    assert policy.steps == (10, 100) and policy.interval_s == 5 and policy.min_requests == 20
    assert RolloutPolicy.from_dict(policy.to_dict()) == policy
    assert RolloutPolicy().validate().steps == (5, 25, 50, 100)


@pytest.mark.parametrize("body, complaint", [
    ({"steps": [50, 25, 100]}, "increase"),
    ({"steps": [5, 50]}, "last rollout step must be 100"),
    ({"steps": [0, 100]}, "between 1 and 100"),
    ({"steps": []}, "between 1 and 100"),
    ({"min_requests": 0}, "min_requests"),
    ({"max_latency_ratio": 0.5}, "max_latency_ratio"),
    ({"max_latency_ratio": float("nan")}, "max_latency_ratio"),  # NaN compares false: it switched the gate off
    ({"max_latency_ratio": float("inf")}, "max_latency_ratio"),
    ({"max_error_rate_delta": float("nan")}, "max_error_rate_delta"),
    ({"interval_s": float("nan")}, "interval_s"),
    ({"max_error_rate_delta": 2}, "max_error_rate_delta"),
    ({"latency_statistic": "p99"}, "latency_statistic"),
    ({"interval": 3}, "unknown rollout field"),
])
def test_policy_rejects_bad_settings(body, complaint):
    with pytest.raises(ValidationFailed, match=complaint):
        RolloutPolicy.from_dict(body)


# -- verdicts ---------------------------------------------------------------------------------------


def test_too_few_canary_requests_wait_even_when_all_failed():
    verdict = evaluate(RolloutPolicy(min_requests=20), stats(400), stats(19, errors=19), elapsed_s=999)
    assert verdict.action == "wait" and "19 of 20" in verdict.reason


def test_error_rate_above_stables_by_more_than_the_delta_rolls_back_before_the_interval():
    policy = RolloutPolicy(min_requests=20, max_error_rate_delta=0.05, interval_s=60)
    verdict = evaluate(policy, stats(200, errors=4), stats(20, errors=3), elapsed_s=1)  # 2% vs 15%
    assert verdict.action == "rollback" and "error rate 15.0%" in verdict.reason
    assert verdict.observed["canary"]["error_rate"] == 0.15 and verdict.observed["stable"]["errors"] == 4
    # The same canary error rate is fine when stable fails as often (the model is not the cause).
    assert evaluate(policy, stats(200, errors=26), stats(20, errors=3), elapsed_s=1).action == "wait"


@pytest.mark.parametrize("statistic", ["mean", "p95"])
def test_latency_beyond_the_ratio_rolls_back(statistic):
    policy = RolloutPolicy(min_requests=10, max_latency_ratio=2.0, latency_statistic=statistic, interval_s=0)
    slow = evaluate(policy, stats(100, latency_s=0.008), stats(10, latency_s=0.08), elapsed_s=5)
    assert slow.action == "rollback" and f"canary {statistic} latency" in slow.reason
    assert slow.observed["latency_ratio"] > 2
    assert evaluate(policy, stats(100, latency_s=0.008), stats(10, latency_s=0.009), elapsed_s=5).action == "advance"


def test_healthy_canary_advances_only_after_the_interval():
    policy = RolloutPolicy(min_requests=10, interval_s=30)
    assert evaluate(policy, stats(100), stats(10), elapsed_s=29).action == "wait"
    assert evaluate(policy, stats(100), stats(10), elapsed_s=30).action == "advance"
    # No stable traffic in the step: only the canary's own error rate is judged.
    assert evaluate(policy, stats(0), stats(10), elapsed_s=30).action == "advance"


# -- metrics arithmetic -----------------------------------------------------------------------------


def test_histogram_quantile_interpolates_like_prometheus():
    buckets = ((0.1, 50.0), (0.2, 90.0), (0.4, 100.0), (INF, 100.0))
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.1)
    assert histogram_quantile(0.95, buckets) == pytest.approx(0.3)  # 95 is half-way through (0.2, 0.4]
    assert histogram_quantile(0.95, ((0.1, 0.0), (INF, 10.0))) == 0.1  # open top bucket: its lower bound
    assert histogram_quantile(0.95, ((0.1, 0.0), (INF, 0.0))) is None


def test_window_arithmetic_and_json_round_trip():
    before, after = stats(10, errors=1), stats(30, errors=2, latency_s=0.02)
    window = after.minus(before)
    assert (window.requests, window.errors) == (20, 1) and dict(window.buckets)[INF] == 20
    assert TrackStats.from_json(after.to_json()) == after
    assert stats(5).went_back_from(stats(10)) and not stats(10).went_back_from(stats(5))


async def test_process_metrics_reads_the_exported_series():
    labels = ("acme", "rules-test", "tiny", "7", "true")
    metrics.REQUESTS.labels(*labels, "ok").inc(3)
    metrics.REQUESTS.labels(*labels, "error").inc(1)
    for seconds in (0.004, 0.004, 0.004, 0.2):
        metrics.LATENCY.labels(*labels).observe(seconds)
    read = await ProcessMetrics().read("acme", "rules-test", "tiny", 7, canary=True)
    assert (read.requests, read.errors) == (4, 1) and read.latency_sum == pytest.approx(0.212)
    assert read.latency("mean") == pytest.approx(0.053)
    assert (await ProcessMetrics().read("acme", "rules-test", "tiny", 7, canary=False)).requests == 0


async def test_process_metrics_keep_tenants_apart():
    """Deployment names are per tenant: another tenant's same-named deployment is not in the figures."""
    metrics.REQUESTS.labels("acme", "rules-shared", "tiny", "7", "true", "ok").inc(5)
    metrics.REQUESTS.labels("globex", "rules-shared", "tiny", "7", "true", "error").inc(2)
    acme = await ProcessMetrics().read("acme", "rules-shared", "tiny", 7, canary=True)
    globex = await ProcessMetrics().read("globex", "rules-shared", "tiny", 7, canary=True)
    assert (acme.requests, acme.errors) == (5, 0)
    assert (globex.requests, globex.errors) == (2, 2)
