"""Gate decisions: relative allowance by the metric's direction; missing evaluations started; failed ones named."""

import asyncio

import pytest

from services.common.errors import ValidationFailed
from services.registry.gates import Figure, Gate, decide, judge

LOSS = Gate("external", 1, "test", "loss", 0.02)
ACCURACY = Gate("external", 1, "test", "token_accuracy", 0.02)


def test_the_allowance_is_relative_and_follows_the_metric_direction():
    assert judge(LOSS, 2.0, 2.04) and not judge(LOSS, 2.0, 2.041) and judge(LOSS, 2.0, 1.0)
    assert judge(ACCURACY, 0.5, 0.49) and not judge(ACCURACY, 0.5, 0.489) and judge(ACCURACY, 0.5, 0.9)


def test_a_gate_names_what_is_wrong_with_it():
    broken = ((Gate("x", 0, "test", "loss", 0.1), "dataset.version"), (Gate("x", 1, "train", "loss", 0.1), "split"),
              (Gate("x", 1, "test", "bleu", 0.1), "metric"), (Gate("x", 1, "test", "loss", -1), "max_regression"))
    for gate, field in broken:
        with pytest.raises(ValidationFailed, match=field):
            gate.validated()


class Known:
    """The evaluations the gate would find (an in-memory table: the decision logic, not the service)."""

    def __init__(self, figures: dict[int, Figure]) -> None:
        self.figures, self.started = figures, []

    async def figure(self, model, version, gate):
        return self.figures.get(version, Figure("missing"))

    async def start(self, model, version, gate):
        self.started.append(version)
        return f"e{version}"


def test_missing_evaluations_are_started_and_the_move_waits():
    known = Known({1: Figure("done", 2.0, "e1")})
    decision = asyncio.run(decide(LOSS, known, "m", 1, 2))
    assert not decision.allowed and decision.pending and known.started == [2]
    assert decision.message.startswith("evaluation pending") and "e2" in decision.message


def test_a_worse_version_is_refused_naming_both_figures_and_a_better_one_passes():
    known = Known({1: Figure("done", 2.0, "e1"), 2: Figure("done", 2.5, "e2"), 3: Figure("done", 1.5, "e3")})
    refused = asyncio.run(decide(LOSS, known, "m", 1, 2))
    assert not refused.allowed and not refused.pending and "2.5" in refused.message and "2" in refused.message
    passed = asyncio.run(decide(LOSS, known, "m", 1, 3))
    assert passed.allowed and passed.message.startswith("gate passed")
    failed = asyncio.run(decide(LOSS, Known({1: Figure("done", 2.0), 2: Figure("failed", error="boom")}), "m", 1, 2))
    assert not failed.allowed and "boom" in failed.message
