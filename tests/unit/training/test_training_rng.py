"""RNG state a checkpoint carries round-trips through a file, without S3 (checkpoints in S3:
tests/integration/training/test_training_checkpoints.py)."""

from __future__ import annotations

import torch

from services.training import checkpoints, distributed

SINGLE = distributed.Context(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"), backend=None)


def test_rng_state_round_trips(tmp_path):
    torch.manual_seed(4)
    state = checkpoints.rng_state(SINGLE.device)
    expected = torch.rand(3)
    torch.save(state, tmp_path / "rng.pt")
    torch.rand(10)
    checkpoints.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True), SINGLE.device)
    assert torch.equal(torch.rand(3), expected)
