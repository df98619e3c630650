"""Canary rollouts: a deployment's canary weight advances step by step while the canary stays healthy.

A rollout starts with the canary at the policy's first step (default 5 → 25 → 50 → 100 percent). Every
`tick_s` the controller compares the canary with stable over the requests served since the step began,
read from the fleet-wide per-version figures every inference replica adds into PostgreSQL
(services/inference/metrics.py `FleetMetrics`, read here by `DatabaseMetrics`):

- once the canary has served `min_requests` in the step, an error rate more than `max_error_rate_delta`
  above stable's, or a latency (p95 or mean) more than `max_latency_ratio` times stable's, ROLLS BACK at
  once: canary weight 0, the model's aliases untouched, an event with the reason and the figures;
- otherwise, after `interval_s` at the step, the weight moves to the next step; reaching 100 PROMOTES:
  stable := the canary version, canary cleared.

Weights are applied through the deployment itself (`Deployments.put`, so its row, ETag and the service's
own weighted, sticky routing change together, as for a client's PUT; on Kubernetes it also sets the
deployment's route in the mesh, services/inference/mesh.py). A PUT by anyone else while a rollout is in
progress ABORTS the rollout (the client's deployment wins).
Rollouts and events live in PostgreSQL (migrations/002_canary_rollouts.sql); each tick locks a
rollout's row (SKIP LOCKED), so replicas never act twice on one step.

The figures are the whole fleet's, so a canary pod's requests count wherever the controller runs. A
step's window is the sum of the table's 10 s buckets from the one holding the step's start, minus what
those buckets held when the step began (the baseline, kept with its `since`), i.e. exactly what was
flushed during the step. Each replica flushes every `metrics.FLUSH_INTERVAL_S` (2 s), so the window is
blurred by up to one flush interval at each end: requests served just before the step began (the same
canary version, at the previous weight) may count in it, and those of the last interval before a
judgement are not seen yet. The controller therefore holds a step for `interval_s` plus the source's
`lag_s` (one flush interval) before it advances, so every request of the step's first `interval_s` is
judged; rollbacks are not delayed. Set `interval_s` well above the flush interval. A step still
undecided after the buckets' retention (6 h) sees its sums drop as buckets are pruned and restarts with
a fresh window. `ProcessMetrics` (this process's Prometheus series only) remains for tests.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime
from itertools import pairwise
from typing import Protocol

from services.common.db import Database
from services.common.errors import Conflict, NotFound, PreconditionFailed, ValidationFailed
from services.common.periodic import Periodic
from services.inference import metrics
from services.inference.deployments import Deployments, DeploymentSpec
from services.inference.metrics import histogram_quantile

log = logging.getLogger(__name__)

DEFAULT_STEPS = (5, 25, 50, 100)
LATENCY_STATISTICS = ("p95", "mean")


# -- the policy -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RolloutPolicy:
    """How a canary is advanced and when it is rolled back (the deployment's `canary.rollout`)."""

    steps: tuple[int, ...] = DEFAULT_STEPS  # canary weights in %, increasing; the last is 100 (= promote)
    interval_s: float = 60.0  # least time at each step before it may advance
    min_requests: int = 20  # least canary requests at a step before it is judged
    max_error_rate_delta: float = 0.02  # canary error rate may exceed stable's by this much (0.02 = 2 points)
    max_latency_ratio: float = 1.5  # canary latency may be at most this many times stable's
    latency_statistic: str = "p95"  # "p95" or "mean" of the request latency

    def validate(self) -> "RolloutPolicy":
        steps = self.steps
        if not steps or any(not 1 <= step <= 100 for step in steps):
            raise ValidationFailed(f"rollout steps must be weights between 1 and 100, not {list(steps)}")
        if any(later <= earlier for earlier, later in pairwise(steps)):
            raise ValidationFailed(f"rollout steps must increase, not {list(steps)}")
        if steps[-1] != 100:
            raise ValidationFailed(f"the last rollout step must be 100 (promotion), not {steps[-1]}")
        if not 0 <= self.interval_s < math.inf:  # written so that NaN fails too
            raise ValidationFailed("rollout interval_s must be a finite number, not negative")
        if self.min_requests < 1:
            raise ValidationFailed("rollout min_requests must be at least 1")
        if not 0 <= self.max_error_rate_delta <= 1:
            raise ValidationFailed("rollout max_error_rate_delta must be between 0 and 1")
        if not 1 <= self.max_latency_ratio < math.inf:  # NaN or infinity would switch the latency gate off
            raise ValidationFailed("rollout max_latency_ratio must be a finite number of at least 1")
        if self.latency_statistic not in LATENCY_STATISTICS:
            raise ValidationFailed(f"rollout latency_statistic must be one of {', '.join(LATENCY_STATISTICS)}")
        return self

    @classmethod
    def from_dict(cls, value: Mapping) -> "RolloutPolicy":
        """From a REST/JSON body; missing keys take the defaults."""
        known = {key: value[key] for key in cls.__dataclass_fields__ if key in value}
        unknown = sorted(set(value) - set(known))
        if unknown:
            raise ValidationFailed(f"unknown rollout field(s): {', '.join(unknown)}")
        if "steps" in known:
            known["steps"] = tuple(int(step) for step in known["steps"])
        return cls(**known).validate()

    def to_dict(self) -> dict:
        return {**asdict(self), "steps": list(self.steps)}


# -- what a track served ----------------------------------------------------------------------------


@dataclass(frozen=True)
class TrackStats:
    """Cumulative counters of one served version (stable or canary track) of a deployment."""

    requests: float = 0.0
    errors: float = 0.0
    latency_sum: float = 0.0  # seconds, over every request
    buckets: tuple[tuple[float, float], ...] = ()  # (upper bound s, cumulative count), +inf last

    def minus(self, earlier: "TrackStats") -> "TrackStats":
        before = dict(earlier.buckets)
        return TrackStats(self.requests - earlier.requests, self.errors - earlier.errors,
                          self.latency_sum - earlier.latency_sum,
                          tuple((bound, count - before.get(bound, 0.0)) for bound, count in self.buckets))

    def went_back_from(self, earlier: "TrackStats") -> bool:
        """True when the counters went back since `earlier` was read (a process restart, pruned buckets)."""
        return self.requests < earlier.requests or self.errors < earlier.errors

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests > 0 else 0.0

    def latency(self, statistic: str) -> float | None:
        if self.requests <= 0:
            return None
        return self.latency_sum / self.requests if statistic == "mean" else histogram_quantile(0.95, self.buckets)

    def summary(self, statistic: str) -> dict:
        latency = self.latency(statistic)
        return {"requests": int(self.requests), "errors": int(self.errors), "error_rate": round(self.error_rate, 4),
                f"latency_{statistic}_s": None if latency is None else round(latency, 6)}

    def to_json(self) -> dict:
        return {"requests": self.requests, "errors": self.errors, "latency_sum": self.latency_sum,
                "buckets": [[_bound_to_json(bound), count] for bound, count in self.buckets]}

    @classmethod
    def from_json(cls, value: Mapping) -> "TrackStats":
        return cls(value.get("requests", 0.0), value.get("errors", 0.0), value.get("latency_sum", 0.0),
                   tuple((float(bound), count) for bound, count in value.get("buckets", ())))


def _bound_to_json(bound: float) -> float | str:
    return "+Inf" if bound == float("inf") else bound


class MetricsSource(Protocol):
    lag_s: float  # how late a request served now may appear in `read`

    async def read(self, tenant: str, deployment: str, model: str, version: int, canary: bool,
                   since: datetime) -> TrackStats:
        """Cumulative counters of one track of a tenant's deployment over a window that begins at or before
        `since` and grows with time: two reads with the same `since` differ by what was counted between them."""


def _track_stats(totals: metrics.Totals) -> TrackStats:
    return TrackStats(float(totals.requests), float(totals.errors), totals.latency_sum,
                      tuple((bound, float(count))
                            for bound, count in zip(metrics.LATENCY_BOUNDS, totals.latency_buckets, strict=True)))


class DatabaseMetrics:
    """The fleet's figures: what every inference replica flushed into PostgreSQL (metrics.FleetMetrics),
    summed over the buckets from the one holding `since` on."""

    def __init__(self, db: Database, lag_s: float = metrics.FLUSH_INTERVAL_S) -> None:
        self.db = db
        self.lag_s = lag_s

    async def read(self, tenant: str, deployment: str, model: str, version: int, canary: bool,
                   since: datetime) -> TrackStats:
        return _track_stats(await metrics.fleet_totals(self.db, (tenant, deployment, model, version, canary), since))


class ProcessMetrics:
    """This process's `llmp_inference_*` metrics, as exported on /metrics (since it started; `since` is
    ignored). Right only with a single inference process; tests use it."""

    lag_s = 0.0

    async def read(self, tenant: str, deployment: str, model: str, version: int, canary: bool,
                   since: datetime | None = None) -> TrackStats:
        counted = metrics.process_totals().get((tenant, deployment, model, version, canary), metrics.Totals())
        return _track_stats(counted)


# -- the decision -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    action: str  # "wait", "advance" or "rollback"
    reason: str
    observed: dict = field(default_factory=dict)


def evaluate(policy: RolloutPolicy, stable: TrackStats, canary: TrackStats, elapsed_s: float) -> Verdict:
    """Judge one step from what each track served during it."""
    statistic = policy.latency_statistic
    observed = {"stable": stable.summary(statistic), "canary": canary.summary(statistic),
                "elapsed_s": round(elapsed_s, 3)}
    if canary.requests < policy.min_requests:
        return Verdict("wait", f"{int(canary.requests)} of {policy.min_requests} canary requests", observed)
    delta = canary.error_rate - stable.error_rate
    if delta > policy.max_error_rate_delta:
        return Verdict("rollback", f"canary error rate {canary.error_rate:.1%} exceeds stable's "
                                   f"{stable.error_rate:.1%} by more than {policy.max_error_rate_delta:.1%}",
                       observed)
    stable_latency, canary_latency = stable.latency(statistic), canary.latency(statistic)
    if stable_latency and canary_latency is not None:  # no stable traffic in the step: nothing to compare
        ratio = canary_latency / stable_latency
        observed["latency_ratio"] = round(ratio, 3)
        if ratio > policy.max_latency_ratio:
            return Verdict("rollback", f"canary {statistic} latency {canary_latency * 1000:.1f} ms is "
                                       f"{ratio:.2f}x stable's {stable_latency * 1000:.1f} ms "
                                       f"(at most {policy.max_latency_ratio:.2f}x)", observed)
    if elapsed_s < policy.interval_s:
        return Verdict("wait", f"healthy; {policy.interval_s - elapsed_s:.1f} s left at this step", observed)
    return Verdict("advance", "healthy for the step's interval", observed)


# -- the controller ---------------------------------------------------------------------------------

def policy_of(row: Mapping) -> RolloutPolicy:
    return RolloutPolicy(tuple(row["steps"]), row["interval_s"], row["min_requests"], row["max_error_rate_delta"],
                         row["max_latency_ratio"], row["latency_statistic"])


class CanaryController:
    """Starts rollouts, drives those in progress every `tick_s`, and reports them with their events."""

    def __init__(self, db: Database, deployments: Deployments, *, source: MetricsSource | None = None,
                 tick_s: float = 1.0) -> None:
        self.db = db
        self.deployments = deployments
        self.source = source or DatabaseMetrics(db)
        self.tick_s = tick_s
        self._loop = Periodic("canary tick", tick_s, self.tick, first_at_start=True)

    # -- lifecycle ------------------------------------------------------------------------------------

    def start(self) -> None:
        self._loop.start()

    async def close(self) -> None:
        await self._loop.close()

    # -- API ------------------------------------------------------------------------------------------

    async def begin(self, tenant: str, name: str, canary_version: int, policy: RolloutPolicy = RolloutPolicy(),
                    *, if_match: str = "", wait: bool = False) -> dict:
        """Put `canary_version` at the policy's first step and start driving it; returns `status`."""
        policy.validate()
        current = await self.deployments.get(tenant, name)
        if if_match and current["etag"] != if_match:
            raise PreconditionFailed(f"deployment {name!r} does not match If-Match {if_match}")
        if canary_version == current["stable_version"]:
            raise Conflict(f"version {canary_version} is already stable in deployment {name!r}")
        # A stable that is the target of a gated alias (say `production`): the canary must pass that gate
        # before any traffic reaches it (registry, services/registry/gates.py). Local sources have no gates.
        check_gates = getattr(self.deployments.source, "check_gates", None)
        if check_gates is not None:
            await check_gates(tenant, current["model"], current["stable_version"], canary_version)
        async with self.db.transaction() as conn:
            running = await (await conn.execute(
                "SELECT * FROM inference_canary_rollouts WHERE tenant = %s AND name = %s AND state = 'PROGRESSING' "
                "FOR UPDATE", (tenant, name))).fetchone()
            if running is not None:
                await self._finish(conn, running, "ABORTED", running["weight"], "superseded by a new rollout", {})
        spec = DeploymentSpec(name, current["model"], current["stable_version"], canary_version, policy.steps[0])
        await self.deployments.put(tenant, spec, if_match=current["etag"], wait=wait)
        async with self.db.transaction() as conn:
            baseline = await self._baseline(conn, tenant, name, current["model"], current["stable_version"],
                                            canary_version)  # since now(): the row's step_started_at
            rollout = await (await conn.execute(
                """INSERT INTO inference_canary_rollouts
                       (tenant, name, model, stable_version, canary_version, steps, interval_s, min_requests,
                        max_error_rate_delta, max_latency_ratio, latency_statistic, state, weight, baseline)
                   VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, 'PROGRESSING', %s, %s) RETURNING *""",
                (tenant, name, current["model"], current["stable_version"], canary_version, list(policy.steps),
                 policy.interval_s, policy.min_requests, policy.max_error_rate_delta, policy.max_latency_ratio,
                 policy.latency_statistic, policy.steps[0], json.dumps(baseline)))).fetchone()
            previous_weight = current["canary_weight"] if current["canary_version"] == canary_version else 0
            await self._event(conn, rollout["id"], "STARTED", previous_weight, policy.steps[0],
                              f"canary v{canary_version} against stable v{current['stable_version']}", {})
        log.info("canary rollout started", extra={"deployment": name, "canary_version": canary_version,
                                                  "steps": list(policy.steps)})
        return await self.status(tenant, name)

    async def status(self, tenant: str, name: str) -> dict:
        """The deployment's latest rollout with its policy and every event; NotFound when it never had one."""
        async with self.db.pool.connection() as conn:
            row = await (await conn.execute(
                "SELECT * FROM inference_canary_rollouts WHERE tenant = %s AND name = %s ORDER BY id DESC LIMIT 1",
                (tenant, name))).fetchone()
            if row is None:
                raise NotFound(f"deployment {name!r} has no canary rollout")
            events = await (await conn.execute(
                "SELECT kind, at, from_weight, to_weight, reason, observed FROM inference_canary_events "
                "WHERE rollout_id = %s ORDER BY id", (row["id"],))).fetchall()
        return {"id": row["id"], "canary_version": row["canary_version"], "stable_version": row["stable_version"],
                "state": row["state"], "step": row["step_index"], "weight": row["weight"], "reason": row["reason"],
                "policy": policy_of(row).to_dict(), "created_at": row["created_at"],
                "updated_at": row["updated_at"], "events": events}

    # -- the loop -------------------------------------------------------------------------------------

    async def tick(self) -> None:
        """Judge every rollout in progress once (each under its row lock; others' locked rows are skipped)."""
        async with self.db.pool.connection() as conn:
            ids = [row["id"] for row in await (await conn.execute(
                "SELECT id FROM inference_canary_rollouts WHERE state = 'PROGRESSING' ORDER BY id")).fetchall()]
        for rollout_id in ids:
            async with self.db.transaction() as conn:
                rollout = await (await conn.execute(
                    "SELECT *, extract(epoch FROM now() - step_started_at)::float8 AS elapsed_s "
                    "FROM inference_canary_rollouts WHERE id = %s AND state = 'PROGRESSING' "
                    "FOR UPDATE SKIP LOCKED", (rollout_id,))).fetchone()
                if rollout is not None:
                    await self._judge(conn, rollout)

    async def _judge(self, conn, rollout: dict) -> None:
        tenant, name = rollout["tenant"], rollout["name"]
        try:
            deployment = await self.deployments.get(tenant, name)
        except NotFound:
            await self._finish(conn, rollout, "ABORTED", 0, "the deployment was deleted", {})
            return
        expected = (rollout["stable_version"], rollout["canary_version"], rollout["weight"])
        actual = (deployment["stable_version"], deployment["canary_version"], deployment["canary_weight"])
        if actual != expected:
            await self._finish(conn, rollout, "ABORTED", deployment["canary_weight"] or 0,
                               f"the deployment was changed outside the rollout (stable, canary, weight: "
                               f"{actual}, expected {expected})", {})
            return
        baseline = rollout["baseline"]
        since = datetime.fromisoformat(baseline["since"]) if "since" in baseline else rollout["step_started_at"]
        now = await self._read(tenant, name, rollout["model"], rollout["stable_version"], rollout["canary_version"],
                               since)
        if deployment["state"] == "FAILED":  # the canary would not load: take it out of the deployment
            await self._roll_back(conn, rollout, deployment, f"the canary failed to load: {deployment['message']}", {},
                                  keep_canary=False)
            return
        stable_before = TrackStats.from_json(rollout["baseline"].get("stable", {}))
        canary_before = TrackStats.from_json(rollout["baseline"].get("canary", {}))
        stable_now, canary_now = TrackStats.from_json(now["stable"]), TrackStats.from_json(now["canary"])
        if (deployment["state"] != "READY" or stable_now.went_back_from(stable_before)
                or canary_now.went_back_from(canary_before)):
            await self._restart_step(conn, rollout)  # still loading, or counters went back: a fresh window
            return
        policy = policy_of(rollout)
        # The last `lag_s` of the step may not be in the figures yet: that time does not count towards the interval.
        verdict = evaluate(policy, stable_now.minus(stable_before), canary_now.minus(canary_before),
                           max(0.0, rollout["elapsed_s"] - self.source.lag_s))
        if verdict.action == "rollback":
            await self._roll_back(conn, rollout, deployment, verdict.reason, verdict.observed)
        elif verdict.action == "advance":
            await self._advance(conn, rollout, deployment, policy, verdict)

    async def _advance(self, conn, rollout: dict, deployment: dict, policy: RolloutPolicy,
                       verdict: Verdict) -> None:
        tenant, name = rollout["tenant"], rollout["name"]
        index = rollout["step_index"] + 1
        weight = policy.steps[index]
        if weight == 100:
            spec = DeploymentSpec(name, deployment["model"], rollout["canary_version"])
            if not await self._put(conn, rollout, spec, deployment["etag"]):
                return
            await self._finish(conn, rollout, "PROMOTED", 100,
                               f"v{rollout['canary_version']} is now stable ({verdict.reason})", verdict.observed)
            log.info("canary promoted", extra={"deployment": name, "version": rollout["canary_version"]})
            return
        spec = DeploymentSpec(name, deployment["model"], rollout["stable_version"], rollout["canary_version"], weight)
        if not await self._put(conn, rollout, spec, deployment["etag"]):
            return
        baseline = await self._baseline(conn, tenant, name, rollout["model"], rollout["stable_version"],
                                        rollout["canary_version"])
        await conn.execute(
            "UPDATE inference_canary_rollouts SET step_index = %s, weight = %s, baseline = %s, "
            "step_started_at = now(), updated_at = now() WHERE id = %s",
            (index, weight, json.dumps(baseline), rollout["id"]))
        await self._event(conn, rollout["id"], "ADVANCED", rollout["weight"], weight, verdict.reason, verdict.observed)
        log.info("canary advanced", extra={"deployment": name, "weight": weight})

    async def _roll_back(self, conn, rollout: dict, deployment: dict, reason: str, observed: dict, *,
                         keep_canary: bool = True) -> None:
        """Weight 0 (the canary version kept on record); the model's aliases are never touched."""
        spec = DeploymentSpec(rollout["name"], deployment["model"], rollout["stable_version"],
                              rollout["canary_version"] if keep_canary else None, 0)
        if not await self._put(conn, rollout, spec, deployment["etag"]):
            return
        await self._finish(conn, rollout, "ROLLED_BACK", 0, reason, observed)
        log.warning("canary rolled back", extra={"deployment": rollout["name"], "reason": reason})

    async def _put(self, conn, rollout: dict, spec: DeploymentSpec, etag: str) -> bool:
        """Apply `spec` unless someone changed the deployment since it was read (then abort the rollout)."""
        try:
            await self.deployments.put(rollout["tenant"], spec, if_match=etag, wait=True)
        except (PreconditionFailed, NotFound) as error:
            await self._finish(conn, rollout, "ABORTED", rollout["weight"],
                               f"the deployment changed during the rollout: {error}", {})
            return False
        return True

    async def _restart_step(self, conn, rollout: dict) -> None:
        baseline = await self._baseline(conn, rollout["tenant"], rollout["name"], rollout["model"],
                                        rollout["stable_version"], rollout["canary_version"])
        await conn.execute("UPDATE inference_canary_rollouts SET baseline = %s, step_started_at = now() "
                           "WHERE id = %s", (json.dumps(baseline), rollout["id"]))

    async def _finish(self, conn, rollout: dict, state: str, to_weight: int, reason: str, observed: dict) -> None:
        await conn.execute("UPDATE inference_canary_rollouts SET state = %s, weight = %s, reason = %s, "
                           "updated_at = now() WHERE id = %s", (state, to_weight, reason, rollout["id"]))
        await self._event(conn, rollout["id"], state, rollout["weight"], to_weight, reason, observed)

    @staticmethod
    async def _event(conn, rollout_id: int, kind: str, from_weight: int, to_weight: int, reason: str,
                     observed: dict) -> None:
        await conn.execute(
            "INSERT INTO inference_canary_events (rollout_id, kind, from_weight, to_weight, reason, observed) "
            "VALUES (%s, %s, %s, %s, %s, %s)", (rollout_id, kind, from_weight, to_weight, reason, json.dumps(observed)))

    async def _read(self, tenant: str, name: str, model: str, stable_version: int, canary_version: int,
                    since: datetime) -> dict:
        """Both tracks' counters over the window from `since` (kept with them: a step's reads share it)."""
        stable = await self.source.read(tenant, name, model, stable_version, False, since)
        canary = await self.source.read(tenant, name, model, canary_version, True, since)
        return {"since": since.isoformat(), "stable": stable.to_json(), "canary": canary.to_json()}

    async def _baseline(self, conn, tenant: str, name: str, model: str, stable_version: int,
                        canary_version: int) -> dict:
        """The counters a step starts from, over a window from `conn`'s transaction time (= the step_started_at
        that transaction sets)."""
        since = (await (await conn.execute("SELECT now() AS now")).fetchone())["now"]
        return await self._read(tenant, name, model, stable_version, canary_version, since)
