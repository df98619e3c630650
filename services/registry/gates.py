"""Promotion gates: an alias (say `production`) that moves only to a version measured no worse.

A gate names a dataset version, a split, a metric and `max_regression` (relative). Moving the gated alias
from version C to version N needs a SUCCEEDED evaluation of both on that data (the training service
keeps them, see services/training/evaluation.py), and N's figure no worse than C's by the allowance:
for a lower-is-better metric (loss) `N <= C * (1 + max_regression)`, for accuracy `N >= C * (1 - max_regression)`.

A missing evaluation is started (one per version and data: the submit's idempotency key says which) and
the move is refused as pending (409); a worse figure is refused naming both (409). Every decision, moves
and refusals alike, is an entry of the alias history. Canary rollouts ask the same question (`check`)
before they start.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol

from services.common import contracts
from services.common.db import Database
from services.common.errors import Conflict, NotFound, ValidationFailed

# metric -> True when lower is better (services/training/evaluation.METRICS without `tokens`)
METRICS = {"loss": True, "perplexity": True, "expected_calibration_error": True, "token_accuracy": False}
SPLITS = contracts.EVALUATION_SPLITS
MAX_REGRESSION = 10.0  # a thousand percent: beyond it a gate means nothing


@dataclass(frozen=True)
class Gate:
    dataset_name: str
    dataset_version: int
    split: str
    metric: str
    max_regression: float

    def validated(self) -> Gate:
        contracts.validate_name(self.dataset_name, "dataset.name")
        if self.dataset_version < 1:
            raise ValidationFailed(f"dataset.version must be at least 1, not {self.dataset_version}")
        if self.split not in SPLITS:
            raise ValidationFailed(f"split must be one of {', '.join(SPLITS)}, not {self.split!r}")
        if self.metric not in METRICS:
            raise ValidationFailed(f"metric must be one of {', '.join(METRICS)}, not {self.metric!r}")
        if not (math.isfinite(self.max_regression) and 0 <= self.max_regression <= MAX_REGRESSION):
            raise ValidationFailed(f"max_regression must be in [0, {MAX_REGRESSION:g}], not {self.max_regression}")
        return self

    @property
    def data(self) -> str:
        return f"dataset {self.dataset_name} version {self.dataset_version} ({self.split})"

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Gate:
        return cls(row["dataset_name"], row["dataset_version"], row["split"], row["metric"], row["max_regression"])


@dataclass(frozen=True)
class Figure:
    """What is known of one version on the gate's data."""

    state: str  # "done" | "pending" | "missing" | "failed"
    value: float | None = None
    evaluation_id: str = ""
    error: str = ""


class Evaluations(Protocol):
    """The training service's evaluations, as the gate needs them (registry server: TrainingEvaluations)."""

    async def figure(self, model: str, version: int, gate: Gate) -> Figure: ...

    async def start(self, model: str, version: int, gate: Gate) -> str: ...


@dataclass(frozen=True)
class Decision:
    allowed: bool
    pending: bool
    message: str


def judge(gate: Gate, current: float, candidate: float) -> bool:
    """Whether `candidate` is no worse than `current` by the gate's relative allowance."""
    allowance = abs(current) * gate.max_regression
    return candidate <= current + allowance if METRICS[gate.metric] else candidate >= current - allowance


async def put_gate(db: Database, tenant: str, name: str, alias: str, gate: Gate, actor: str) -> dict[str, Any]:
    contracts.validate_name(name, "model name")
    contracts.validate_name(alias, "alias")
    gate.validated()
    async with db.transaction() as conn:
        if await (await conn.execute("SELECT 1 FROM registry_models WHERE tenant = %s AND name = %s",
                                     (tenant, name))).fetchone() is None:
            raise NotFound(f"model {name} not found")
        return await (await conn.execute(
            """INSERT INTO registry_alias_gates (tenant, name, alias, dataset_name, dataset_version, split, metric,
                                                 max_regression, updated_by)
               VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)
               ON CONFLICT (tenant, name, alias) DO UPDATE SET dataset_name = EXCLUDED.dataset_name,
                   dataset_version = EXCLUDED.dataset_version, split = EXCLUDED.split, metric = EXCLUDED.metric,
                   max_regression = EXCLUDED.max_regression, updated_by = EXCLUDED.updated_by, updated_at = now()
               RETURNING *""",
            (tenant, name, alias, gate.dataset_name, gate.dataset_version, gate.split, gate.metric,
             gate.max_regression, actor))).fetchone()


async def get_gate(db: Database, tenant: str, name: str, alias: str) -> Gate | None:
    async with db.pool.connection() as conn:
        row = await (await conn.execute(
            "SELECT * FROM registry_alias_gates WHERE tenant = %s AND name = %s AND alias = %s",
            (tenant, name, alias))).fetchone()
    return Gate.from_row(row) if row else None


async def decide(gate: Gate, evaluations: Evaluations, name: str, current: int, candidate: int) -> Decision:
    """May the gated alias move from version `current` to `candidate`? Starts the evaluations it lacks."""
    if current == candidate:
        return Decision(True, False, "")
    figures = {version: await evaluations.figure(name, version, gate) for version in (current, candidate)}
    failed = [f"version {v}: {f.error or 'evaluation failed'}" for v, f in figures.items() if f.state == "failed"]
    if failed:
        return Decision(False, False, f"gate on {gate.data}: an evaluation failed ({'; '.join(failed)})")
    waiting = []
    for version, figure in figures.items():
        if figure.state == "missing":
            waiting.append(f"version {version} (evaluation {await evaluations.start(name, version, gate)} started)")
        elif figure.state == "pending":
            waiting.append(f"version {version} (evaluation {figure.evaluation_id} running)")
    if waiting:
        return Decision(False, True, f"evaluation pending: gate on {gate.data} waits for {', '.join(waiting)}")
    now, new = figures[current].value, figures[candidate].value
    assert now is not None and new is not None
    better = "lower" if METRICS[gate.metric] else "higher"
    summary = (f"{gate.metric} of version {candidate} is {new:.6g}, of version {current} (current) {now:.6g} "
               f"on {gate.data}; allowed regression {gate.max_regression:g} ({better} is better)")
    if judge(gate, now, new):
        return Decision(True, False, f"gate passed: {summary}")
    return Decision(False, False, f"gate refused: {summary}")


async def record_refusal(db: Database, tenant: str, name: str, alias: str, candidate: int, decision: Decision,
                         actor: str, reason: str) -> None:
    """A refused (or pending) move, as an entry of the alias history at its current revision."""
    async with db.transaction() as conn:
        current = await (await conn.execute(
            "SELECT version, revision FROM registry_aliases WHERE tenant = %s AND name = %s AND alias = %s",
            (tenant, name, alias))).fetchone()
        if current is None:
            return
        await conn.execute(
            """INSERT INTO registry_alias_history (tenant, name, alias, sequence, from_version, to_version, actor,
                   reason, decision, gate) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)""",
            (tenant, name, alias, current["revision"], current["version"], candidate, actor, reason,
             "pending" if decision.pending else "refused", decision.message))


def refuse(decision: Decision) -> Conflict:
    return Conflict(decision.message)


class TrainingEvaluations:
    """`Evaluations` over the training service's gRPC API (called as the caller whose move is judged)."""

    def __init__(self, clients) -> None:
        self.clients = clients

    async def figure(self, model: str, version: int, gate: Gate) -> Figure:
        from llmp.training.v1 import training_pb2

        listed = await self.clients.training.ListEvaluations(training_pb2.ListEvaluationsRequest(
            model_name=model, model_version=version))
        mine = [e for e in listed.evaluations if e.dataset.name == gate.dataset_name
                and e.dataset.version == gate.dataset_version and e.split == gate.split]  # newest first
        done = [e for e in mine if e.state == training_pb2.JOB_STATE_SUCCEEDED and gate.metric in e.metrics]
        if done:
            return Figure("done", done[0].metrics[gate.metric], done[0].id)
        running = [e for e in mine if e.state in (training_pb2.JOB_STATE_QUEUED, training_pb2.JOB_STATE_RUNNING)]
        if running:
            return Figure("pending", evaluation_id=running[0].id)
        failed = [e for e in mine if e.state == training_pb2.JOB_STATE_FAILED]
        if failed:
            return Figure("failed", evaluation_id=failed[0].id, error=failed[0].error)
        return Figure("missing")

    async def start(self, model: str, version: int, gate: Gate) -> str:
        from llmp.common.v1 import common_pb2
        from llmp.training.v1 import training_pb2

        key = f"gate:{model}:{version}:{gate.dataset_name}:{gate.dataset_version}:{gate.split}"
        started = await self.clients.training.SubmitEvaluation(training_pb2.SubmitEvaluationRequest(
            model=common_pb2.ModelRef(name=model, version=version),
            dataset=common_pb2.DatasetRef(name=gate.dataset_name, version=gate.dataset_version),
            split=gate.split, idempotency_key=key))
        return started.evaluation.id
