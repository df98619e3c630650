"""The runtime end to end: real `torchrun` processes (gloo on CPU) against the real SeaweedFS fixture."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from services.common.s3 import ObjectStore
from services.training import checkpoints
from services.training.checkpoints import JobLayout
from services.training.spec import JobSpec

pytestmark = [pytest.mark.integration, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def store(settings):
    object_store = ObjectStore(settings.s3)
    object_store.ensure_bucket()
    return object_store


@pytest.fixture(scope="module")
def manifest_key(store, tiny_dataset, dataset_uploader):
    root, manifest = tiny_dataset
    return dataset_uploader(store, root, manifest)


def job_file(tmp_path: Path, manifest_key: str, *, mode: str = "ddp", nproc: int = 2, sync_interval: int = 4,
             **hyper) -> tuple[Path, dict]:
    hp = {"batch_size": 8, "max_steps": 24, "learning_rate": 3e-3, "min_learning_rate": 3e-4, "warmup_steps": 4,
          "eval_interval": 8, "eval_batches": 4, "checkpoint_interval": 8, "log_interval": 4, "seed": 7, **hyper}
    spec = JobSpec.from_dict({
        "dataset": {"name": "shakespeare", "version": 1},
        "model": {"family": "gpt2", "n_layer": 2, "n_head": 2, "n_embd": 64, "block_size": 32, "dropout": 0.1},
        "hyperparameters": hp,
        "distributed": {"mode": mode, "nproc_per_node": nproc, "nnodes": 1, "sync_interval": sync_interval},
    })
    job = {"tenant": "acme", "job_id": uuid.uuid4().hex[:12], "spec": spec.to_dict(),
           "dataset_manifest_key": manifest_key, "init_from_prefix": None}
    job_dir = tmp_path / job["job_id"]
    job_dir.mkdir(parents=True)
    (job_dir / "job.json").write_text(json.dumps(job))
    return job_dir, job


def launch(job_dir: Path, settings_env: dict, nproc: int, *extra: str, node_dir: Path | None = None,
           ) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMP_")} | settings_env
    env["OMP_NUM_THREADS"] = "1"
    node = node_dir or job_dir / "node"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
               "-m", "services.training.train", "--job-dir", str(node), "--job", str(job_dir / "job.json"),
               "--events", str(job_dir / "events.jsonl"), *extra]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)


def read_events(job_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (job_dir / "events.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("mode", ["ddp", "local-sgd", "async"])
def test_two_process_run_learns_and_commits_checkpoints(mode, tmp_path, manifest_key, store, settings_env):
    job_dir, job = job_file(tmp_path, manifest_key, mode=mode)
    result = launch(job_dir, settings_env, 2)
    assert result.returncode == 0, result.stderr[-4000:]
    events = read_events(job_dir)
    assert events[0]["event"] == "started" and events[0]["world_size"] == 2 and events[0]["mode"] == mode
    train = [e for e in events if e["event"] == "train"]
    assert [e["step"] for e in train] == [4, 8, 12, 16, 20, 24]
    assert train[-1]["loss"] < train[0]["loss"] - 0.3, [e["loss"] for e in train]
    assert all(e["tokens_per_second"] > 0 for e in train)
    evals = [e for e in events if e["event"] == "eval"]
    assert evals[-1]["validation_loss"] < evals[0]["validation_loss"]
    finished = events[-1]
    assert finished["event"] == "finished" and finished["metrics"]["steps"] == 24
    assert finished["metrics"]["test_perplexity"] > 1

    layout = JobLayout("acme", job["job_id"])
    assert checkpoints.committed_steps(store, layout) == [8, 16, 24]
    committed = json.loads(store.get_bytes(layout.step(24) + checkpoints.COMMITTED))
    names = {obj["key"][len(layout.step(24)):] for obj in committed["objects"]}
    assert {"model/config.json", "model/model.safetensors", "optimizer.pt", "scheduler.pt", "state.json",
            "rank-00000.pt", "rank-00001.pt"} <= names
    for obj in committed["objects"]:
        assert store.stat(obj["key"]).sha256 == obj["sha256"]
    state = json.loads(store.get_bytes(layout.step(24) + "state.json"))
    assert state["step"] == 24 and state["world_size"] == 2 and state["data_position"] == 24 * 8 * 2
    # The final model stays on the node's disk, where Finished says, for the worker to register (no S3 copy).
    final_dir = Path(finished["final_dir"])
    assert final_dir == (job_dir / "node" / "final").resolve()
    final = {path.name for path in final_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= final
    assert store.list(layout.final) == []
    metrics = json.loads(store.get_bytes(layout.metrics))
    assert metrics["validation_loss"] == evals[-1]["validation_loss"]


def final_weights(job_dir: Path) -> dict[str, torch.Tensor]:
    """The weights of the final model the last run of `job_dir` saved (its Finished event names the folder)."""
    finished = [event for event in read_events(job_dir) if event["event"] == "finished"][-1]
    return load_file(Path(finished["final_dir"]) / "model.safetensors")


@pytest.mark.parametrize("mode", ["ddp", "local-sgd", "async"])
def test_interrupted_run_resumes_bit_exactly(mode, tmp_path, manifest_key, store, settings_env):
    """Stopped after the step-8 checkpoint and resumed (fresh node dir, as on another machine), the run
    ends with every weight equal to an uninterrupted run, and its losses after the resume are identical.

    A sync interval of 3 puts the checkpoint between two averagings (local-sgd averages after steps
    1, 4, 7, 10, …; async starts a reduction at 6 that is still in flight at 8): the replicas differ
    there, and a resume that lost the averager's phase or the in-flight reduction would diverge."""
    straight_dir, straight = job_file(tmp_path / "a", manifest_key, mode=mode, max_steps=16, sync_interval=3)
    assert launch(straight_dir, settings_env, 2).returncode == 0

    resumed_dir, resumed = job_file(tmp_path / "b", manifest_key, mode=mode, max_steps=16, sync_interval=3)
    first = launch(resumed_dir, settings_env, 2, "--stop-after-step", "6")
    assert first.returncode == 0, first.stderr[-4000:]
    assert read_events(resumed_dir)[-1]["event"] == "stopped"
    layout = JobLayout("acme", resumed["job_id"])
    assert checkpoints.committed_steps(store, layout) == [8]
    second = launch(resumed_dir, settings_env, 2, node_dir=resumed_dir / "other-node")
    assert second.returncode == 0, second.stderr[-4000:]

    events = read_events(resumed_dir)
    restarts = [e for e in events if e["event"] == "started"]
    assert [e["resumed_from"] for e in restarts] == [None, 8]
    after = {e["step"]: e["loss"] for e in events if e["event"] == "train" and e["step"] > 8}
    reference = {e["step"]: e["loss"] for e in read_events(straight_dir) if e["event"] == "train" and e["step"] > 8}
    assert after == reference and len(after) == 2

    a, b = final_weights(straight_dir), final_weights(resumed_dir)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[name], b[name]) for name in a)


@pytest.fixture(scope="module")
def chat_manifest_key(store, tmp_path_factory, dataset_uploader):
    """A format=chat dataset version (built by the dataset pipeline) in S3."""
    from ...supervised_dataset import addition_chats, write_supervised_dataset

    root = tmp_path_factory.mktemp("chat-dataset") / "dataset"
    manifest = write_supervised_dataset(root, addition_chats(400))
    return dataset_uploader(store, root, {**manifest.to_dict(), "name": "chat", "version": 1})


def test_a_supervised_run_learns_the_answers_and_resumes_bit_exactly(tmp_path, chat_manifest_key, store,
                                                                     settings_env):
    """Two DDP processes on a chat dataset: the validation loss (on assistant tokens only) falls, the final
    model carries the chat template, and a run stopped at a checkpoint and resumed elsewhere ends equal."""
    settings = {"max_steps": 16, "checkpoint_interval": 8, "eval_interval": 8}
    model = {"block_size": 64}
    straight_dir, _ = job_file(tmp_path / "a", chat_manifest_key, **settings)
    _set_model(straight_dir, model)
    result = launch(straight_dir, settings_env, 2)
    assert result.returncode == 0, result.stderr[-4000:]
    events = read_events(straight_dir)
    evals = [e["validation_loss"] for e in events if e["event"] == "eval"]
    assert len(evals) == 2 and evals[-1] < evals[0], evals
    final_dir = Path(events[-1]["final_dir"])
    config = json.loads((final_dir / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in config["chat_template"]

    resumed_dir, resumed = job_file(tmp_path / "b", chat_manifest_key, **settings)
    _set_model(resumed_dir, model)
    first = launch(resumed_dir, settings_env, 2, "--stop-after-step", "6")
    assert first.returncode == 0, first.stderr[-4000:]
    second = launch(resumed_dir, settings_env, 2, node_dir=resumed_dir / "other-node")
    assert second.returncode == 0, second.stderr[-4000:]
    a, b = final_weights(straight_dir), final_weights(resumed_dir)
    assert all(torch.equal(a[name], b[name]) for name in a)


def _set_model(job_dir: Path, changes: dict) -> None:
    job = json.loads((job_dir / "job.json").read_text())
    job["spec"]["model"].update(changes)
    (job_dir / "job.json").write_text(json.dumps(job))
