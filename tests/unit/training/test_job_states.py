"""The training job's state machine, without a database (the coordinator that drives it: tests/integration/training)."""

from __future__ import annotations

from services.training import coordinator as coord
from services.training.coordinator import JobState


def test_transition_table_allows_only_the_documented_moves():
    assert coord.can_transition(JobState.QUEUED, JobState.RUNNING)
    assert coord.can_transition(JobState.RUNNING, JobState.QUEUED)  # lease expired: re-queued
    assert not coord.can_transition(JobState.QUEUED, JobState.SUCCEEDED)
    for final in coord.TERMINAL:
        assert all(not coord.can_transition(final, target) for target in JobState)
