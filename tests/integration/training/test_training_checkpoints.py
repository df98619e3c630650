"""Checkpoints in the real S3 (SeaweedFS): visible only when committed, verified when read."""

from __future__ import annotations

import time
import uuid

import pytest
import torch

from services.common.errors import Conflict, Internal
from services.common.s3 import ObjectStore
from services.training import checkpoints, distributed, models
from services.training.checkpoints import JobLayout
from services.training.spec import ModelSpec

pytestmark = pytest.mark.integration
SINGLE = distributed.Context(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"), backend=None)


@pytest.fixture(scope="module")
def store(settings):
    object_store = ObjectStore(settings.s3)
    object_store.ensure_bucket()
    return object_store


def save(store, layout, step, tmp_path):
    model = models.build_model(ModelSpec(n_layer=1, n_head=2, n_embd=16, block_size=8),
                               models.Vocabulary(20, 19, 19), seed=step)
    optimizer = torch.optim.AdamW(model.parameters())
    return checkpoints.save(store, layout, step, SINGLE, tmp_path, rank_state={"rng": checkpoints.rng_state(
        SINGLE.device)}, model=model, optimizer_state=optimizer.state_dict(), scheduler_state={"last_epoch": step},
        state={"data_position": step * 4}), model


def test_only_committed_steps_are_visible_and_the_latest_wins(store, tmp_path):
    layout = JobLayout("acme", uuid.uuid4().hex)
    assert checkpoints.latest_step(store, layout) is None
    save(store, layout, 5, tmp_path)
    save(store, layout, 10, tmp_path)
    # An interrupted write: objects of step 15 but no COMMITTED marker.
    store.put_bytes(layout.step(15) + "state.json", b"{}")
    store.put_bytes(layout.step(15) + "model/model.safetensors", b"partial")
    assert checkpoints.committed_steps(store, layout) == [5, 10]
    assert checkpoints.latest_step(store, layout) == 10


def test_a_fetched_checkpoint_has_everything_to_resume(store, tmp_path):
    layout = JobLayout("acme", uuid.uuid4().hex)
    _, model = save(store, layout, 3, tmp_path / "w")
    restored = checkpoints.fetch(store, layout, 3, SINGLE, tmp_path / "r")
    assert restored.state["step"] == 3 and restored.state["data_position"] == 12
    assert restored.state["world_size"] == 1
    assert restored.load("scheduler.pt") == {"last_epoch": 3}
    assert "state" in restored.load("optimizer.pt")
    assert set(restored.load(checkpoints.rank_file(0))["rng"]) == {"torch", "python"}
    loaded = models.build_model(ModelSpec(n_layer=1, n_head=2, n_embd=16, block_size=8),
                                models.Vocabulary(20, 19, 19), seed=0, init_dir=restored.folder / "model")
    pairs = zip(model.state_dict().values(), loaded.state_dict().values(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)


def test_a_corrupted_object_is_refused(store, tmp_path):
    layout = JobLayout("acme", uuid.uuid4().hex)
    save(store, layout, 1, tmp_path / "w")
    store.put_bytes(layout.step(1) + "optimizer.pt", b"not the optimizer")  # recorded sha256 no longer matches
    with pytest.raises(Internal, match="checksum mismatch"):
        checkpoints.fetch(store, layout, 1, SINGLE, tmp_path / "r")


def test_a_checkpoint_from_another_world_size_is_refused(store, tmp_path):
    layout = JobLayout("acme", uuid.uuid4().hex)
    save(store, layout, 2, tmp_path / "w")
    two = distributed.Context(rank=0, local_rank=0, world_size=2, device=torch.device("cpu"), backend=None)
    with pytest.raises(Conflict, match="written by 1 processes; this run has 2"):
        checkpoints.fetch(store, layout, 2, two, tmp_path / "r")


class FailingUploads:
    """The real store, except that uploads under `failing` raise: an S3 outage in the middle of a checkpoint."""

    def __init__(self, store, failing: str) -> None:
        self.store, self.failing = store, failing

    def __getattr__(self, name):
        return getattr(self.store, name)

    def put_file(self, key, path, *args, **kwargs):
        if key.startswith(self.failing) and "/model/" in key:
            raise OSError(f"S3 unreachable while uploading {key}")
        return self.store.put_file(key, path, *args, **kwargs)


def begin(store, layout, step, tmp_path, uploads):
    model = models.build_model(ModelSpec(n_layer=1, n_head=2, n_embd=16, block_size=8),
                               models.Vocabulary(20, 19, 19), seed=step)
    return checkpoints.begin(store, layout, step, SINGLE, tmp_path, uploads,
                             rank_state={"rng": checkpoints.rng_state(SINGLE.device)}, model=model,
                             optimizer_state=torch.optim.AdamW(model.parameters()).state_dict(),
                             scheduler_state={"last_epoch": step}, state={"data_position": step * 4})


def test_a_background_upload_that_fails_is_raised_at_its_wait_and_commits_nothing(store, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    layout = JobLayout("acme", uuid.uuid4().hex)
    failing = FailingUploads(store, layout.step(10))
    with ThreadPoolExecutor(max_workers=1) as uploads:
        first = begin(failing, layout, 5, tmp_path, uploads)
        first.future.result()
        time.sleep(0.5)  # committed well before anyone waits for it
        assert first.wait() == layout.step(5)
        assert first.seconds < 0.5, first.seconds  # until its commit, not until the wait
        second = begin(failing, layout, 10, tmp_path, uploads)
        with pytest.raises(OSError, match="S3 unreachable"):
            second.wait()
    assert checkpoints.committed_steps(store, layout) == [5]  # a resume starts from the last good one
    assert not (tmp_path / "step-10").exists()  # its local files are gone either way
