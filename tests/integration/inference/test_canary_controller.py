"""The canary controller on a real Triton and the real inference service, driven by real traffic.

`server.build` starts the controller (one tick a second); the tests start rollouts through its API,
send requests through gRPC, and read the outcome from the deployment and the recorded events.
"""

from __future__ import annotations

import asyncio
import json
import math
import time

import grpc
import pytest

from services.common.errors import Conflict
from services.inference.canary import RolloutPolicy

from .conftest import BROKEN, MODEL, TENANT

pytestmark = [pytest.mark.integration, pytest.mark.slow]


class Traffic:
    """Concurrent single-token requests, each with a fresh routing key, recorded with their completion time."""

    def __init__(self, service, deployment: str, workers: int = 3) -> None:
        self.service, self.deployment = service, deployment
        self.served: list[tuple[float, bool, int]] = []  # (wall-clock time, canary?, version)
        self.failed: list[tuple[float, grpc.StatusCode]] = []
        self._stop = asyncio.Event()
        self._tasks = [asyncio.create_task(self._worker(i)) for i in range(workers)]

    async def _worker(self, worker: int) -> None:
        n = 0
        while not self._stop.is_set():
            n += 1
            try:
                completion = await self.service.generate("O", max_tokens=1, deployment=self.deployment,
                                                          routing_key=f"w{worker}-{n}")
                self.served.append((time.time(), completion.canary, completion.model_version))
            except grpc.aio.AioRpcError as error:
                self.failed.append((time.time(), error.code()))

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)


async def finished(service, name: str, timeout_s: float) -> dict:
    """The rollout's status once it is no longer PROGRESSING."""
    deadline = time.monotonic() + timeout_s
    while True:
        status = await service.canary.status(TENANT, name)
        if status["state"] != "PROGRESSING" or time.monotonic() > deadline:
            return status
        await asyncio.sleep(0.2)


async def test_healthy_canary_is_promoted_step_by_step_with_matching_weights(service):
    await service.deploy("chat-ok", stable=1)
    # Same-sized models on a shared machine: latency is judged loosely here (tests of the rule: test_rollout_rules).
    policy = RolloutPolicy(steps=(5, 25, 50, 100), interval_s=1.0, min_requests=10, max_error_rate_delta=0.05,
                           max_latency_ratio=10.0, latency_statistic="mean")
    started = await service.canary.begin(TENANT, "chat-ok", 2, policy, wait=True)
    assert started["state"] == "PROGRESSING" and started["weight"] == 5
    shown = await service.get("chat-ok")
    assert (shown.stable_version, shown.canary.version, shown.canary.weight) == (1, 2, 5)

    traffic = Traffic(service, "chat-ok")
    status = await finished(service, "chat-ok", timeout_s=90)
    await asyncio.sleep(0.3)  # a few requests after the promotion
    await traffic.stop()

    assert status["state"] == "PROMOTED", status
    events = status["events"]
    assert [(e["kind"], e["from_weight"], e["to_weight"]) for e in events] == [
        ("STARTED", 0, 5), ("ADVANCED", 5, 25), ("ADVANCED", 25, 50), ("PROMOTED", 50, 100)]
    for event in events[1:]:
        assert event["observed"]["canary"]["requests"] >= 10 and event["observed"]["canary"]["errors"] == 0
    promoted = await service.get("chat-ok")
    assert promoted.stable_version == 2 and not promoted.HasField("canary") and promoted.state == "READY"
    assert traffic.failed == []
    promoted_at = events[-1]["at"].timestamp()
    assert all(version == (2 if canary else 1) for at, canary, version in traffic.served if at < promoted_at)
    assert traffic.served[-1][2] == 2

    # What clients saw between two events matches the step's weight: Binomial(n, w), 4 sd plus a little
    # for requests in flight across a boundary.
    for begin, end in zip(events, events[1:], strict=False):
        weight = begin["to_weight"] / 100
        window = [canary for at, canary, _ in traffic.served
                  if begin["at"].timestamp() <= at < end["at"].timestamp()]
        n, hits = len(window), sum(window)
        assert n >= 10, (begin["to_weight"], n)
        bound = 4 * math.sqrt(n * weight * (1 - weight)) + 3
        assert abs(hits - n * weight) <= bound, (begin["to_weight"], hits, n)


async def test_failing_canary_is_rolled_back_by_itself_alias_unchanged(service, model_root):
    alias = model_root[0] / "models" / TENANT / MODEL / "aliases" / "production"
    await service.deploy("chat-bad", stable=1)
    policy = RolloutPolicy(interval_s=30.0, min_requests=5, max_error_rate_delta=0.1)
    clock = time.monotonic()
    await service.canary.begin(TENANT, "chat-bad", BROKEN, policy, wait=True)
    traffic = Traffic(service, "chat-bad")
    status = await finished(service, "chat-bad", timeout_s=60)
    rolled_back_after = time.monotonic() - clock
    await asyncio.sleep(0.5)
    await traffic.stop()

    assert status["state"] == "ROLLED_BACK" and status["weight"] == 0, status
    assert rolled_back_after < policy.interval_s  # judged on errors as soon as enough requests came in
    assert "error rate 100.0%" in status["reason"]
    events = status["events"]
    assert [(e["kind"], e["to_weight"]) for e in events] == [("STARTED", 5), ("ROLLED_BACK", 0)]
    observed = events[-1]["observed"]
    assert observed["canary"]["error_rate"] == 1.0 and observed["stable"]["error_rate"] == 0.0
    shown = await service.get("chat-bad")
    assert (shown.stable_version, shown.canary.version, shown.canary.weight, shown.state) == (1, BROKEN, 0, "READY")
    assert alias.read_text() == "1\n"
    # Only the canary failed, and nothing after the rollback did.
    rolled_back_at = events[-1]["at"].timestamp()
    assert traffic.failed and all(code == grpc.StatusCode.INTERNAL for _, code in traffic.failed)
    assert all(at < rolled_back_at + 0.5 for at, _ in traffic.failed)
    after = [version for at, _, version in traffic.served if at > rolled_back_at + 0.5]
    assert after and set(after) == {1}


async def test_a_clients_change_during_a_rollout_aborts_it(service):
    await service.deploy("chat-mine", stable=1)
    with pytest.raises(Conflict):
        await service.canary.begin(TENANT, "chat-mine", 1)  # already stable
    await service.canary.begin(TENANT, "chat-mine", 2, RolloutPolicy(interval_s=60), wait=True)
    await service.deploy("chat-mine", stable=1, canary=(2, 40))  # the operator takes over
    status = await finished(service, "chat-mine", timeout_s=10)
    assert status["state"] == "ABORTED" and "changed outside the rollout" in status["reason"], status
    assert [e["kind"] for e in status["events"]] == ["STARTED", "ABORTED"]
    shown = await service.get("chat-mine")
    assert (shown.canary.version, shown.canary.weight) == (2, 40)  # the client's deployment wins


async def test_a_rollout_through_put_deployment_is_shown_by_get_deployment(service):
    """The wire: PutDeployment with canary.rollout starts the controller; GetDeployment shows its progress,
    and the ETag covers the rollout, so a tag taken before the rollout moved no longer matches."""
    created = (await service.deploy("chat-wire", stable=1)).deployment
    with pytest.raises(grpc.aio.AioRpcError) as bad:
        await service.rollout("chat-wire", 2, steps=[50, 60])  # does not end at 100
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "100" in bad.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as other_stable:
        await service.rollout("chat-wire", 2, stable=2)
    # well formed, refused by the deployment's state (its stable is 1): 409 through the gateway
    assert other_stable.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "stable" in other_stable.value.details()
    assert not (await service.get("chat-wire")).HasField("rollout")

    started = await service.rollout("chat-wire", 2, if_match=created.etag, steps=[50, 100], interval_s=0.5,
                                    min_requests=3, max_latency_ratio=10.0, latency_statistic="mean")
    assert (started.stable_version, started.canary.version, started.canary.weight) == (1, 2, 50)
    rollout = started.rollout
    assert (rollout.state, rollout.step, rollout.weight, rollout.canary_version) == ("PROGRESSING", 0, 50, 2)
    assert list(rollout.policy.steps) == [50, 100] and rollout.policy.min_requests == 3
    assert rollout.policy.max_error_rate_delta == pytest.approx(0.02)  # unset: the default
    assert [(e.kind, e.from_weight, e.to_weight) for e in rollout.events] == [("STARTED", 0, 50)]
    assert started.etag != created.etag

    traffic = Traffic(service, "chat-wire", workers=2)
    status = await finished(service, "chat-wire", timeout_s=60)
    await traffic.stop()
    assert status["state"] == "PROMOTED", status
    shown = await service.get("chat-wire")
    assert shown.stable_version == 2 and not shown.HasField("canary")
    assert shown.rollout.state == "PROMOTED" and shown.rollout.weight == 100
    assert [e.kind for e in shown.rollout.events] == ["STARTED", "PROMOTED"]
    assert json.loads(shown.rollout.events[-1].observed_json)["canary"]["requests"] >= 3
    with pytest.raises(grpc.aio.AioRpcError) as stale:
        await service.deploy("chat-wire", stable=2, if_match=started.etag)
    assert stale.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert (await service.deploy("chat-wire", stable=2, if_match=shown.etag)).deployment.stable_version == 2
