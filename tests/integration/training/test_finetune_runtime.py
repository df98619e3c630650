"""LoRA fine-tuning in the runtime: real `torchrun` processes (gloo on CPU), every distributed mode, exact
resume, against the real SeaweedFS fixture. The base is a random Llama-style checkpoint with grouped-query
attention built here (tests/tiny_checkpoints.py) and uploaded where a registry version lives."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from services.common.s3 import ObjectStore
from services.training import checkpoints
from services.training.checkpoints import JobLayout
from services.training.spec import JobSpec
from tests.integration.training.test_training_runtime import launch, read_events
from tests.tiny_checkpoints import write_checkpoint

pytestmark = [pytest.mark.integration, pytest.mark.slow]
BASE_PREFIX = "models/acme/llama-base/v1/"


@pytest.fixture(scope="module")
def store(settings):
    object_store = ObjectStore(settings.s3)
    object_store.ensure_bucket()
    return object_store


@pytest.fixture(scope="module")
def manifest_key(store, tiny_dataset, dataset_uploader):
    root, manifest = tiny_dataset
    return dataset_uploader(store, root, manifest)


@pytest.fixture(scope="module")
def base_prefix(store, tiny_dataset, tmp_path_factory) -> str:
    root, manifest = tiny_dataset
    folder = tmp_path_factory.mktemp("llama-base")
    write_checkpoint(folder, "llama", root / "tokenizer", manifest["vocab_size"])
    for path in folder.iterdir():
        store.put_file(BASE_PREFIX + path.name, path)
    return BASE_PREFIX


def job_file(tmp_path: Path, manifest_key: str, base_prefix: str, *, mode: str, max_steps: int = 16,
             sync_interval: int = 3) -> tuple[Path, dict]:
    spec = JobSpec.from_dict({
        "dataset": {"name": "shakespeare", "version": 1},
        "model": {"init_from": {"name": "llama-base", "version": 1}, "block_size": 32,
                  "adapter": {"type": "lora", "r": 8, "alpha": 32, "dropout": 0.1}},
        "hyperparameters": {"batch_size": 8, "max_steps": max_steps, "learning_rate": 1e-2, "min_learning_rate": 1e-3,
                            "warmup_steps": 2, "eval_interval": 8, "eval_batches": 4, "log_interval": 4, "seed": 7},
        "distributed": {"mode": mode, "nproc_per_node": 2, "nnodes": 1, "sync_interval": sync_interval},
    })
    job = {"tenant": "acme", "job_id": uuid.uuid4().hex[:12], "spec": spec.to_dict(),
           "dataset_manifest_key": manifest_key, "init_from_prefix": base_prefix}
    job_dir = tmp_path / job["job_id"]
    job_dir.mkdir(parents=True)
    (job_dir / "job.json").write_text(json.dumps(job))
    return job_dir, job


def final_dir(job_dir: Path) -> Path:
    return Path([event for event in read_events(job_dir) if event["event"] == "finished"][-1]["final_dir"])


@pytest.mark.parametrize("mode", ["ddp", "local-sgd", "async"])
def test_lora_learns_checkpoints_the_adapter_alone_and_resumes_bit_exactly(mode, tmp_path, manifest_key, base_prefix,
                                                                            store, settings_env):
    """Two processes in `mode`: the adapter learns, checkpoints hold the adapter (not the base), and a run
    stopped after its step-8 checkpoint and resumed on another node dir ends with the same adapter, the same
    merged weights and the same losses as an uninterrupted one (sync interval 3 puts the checkpoint between
    two averagings, so a resume that lost the averager's phase or the in-flight reduction would diverge)."""
    straight_dir, straight = job_file(tmp_path / "a", manifest_key, base_prefix, mode=mode)
    result = launch(straight_dir, settings_env, 2)
    assert result.returncode == 0, result.stderr[-4000:]
    events = read_events(straight_dir)
    started = events[0]
    assert started["trainable_parameters"] < started["parameters"] / 5
    assert started["optimizer_state_bytes"] == 2 * 4 * started["trainable_parameters"]
    evals = [e["validation_loss"] for e in events if e["event"] == "eval"]
    assert evals[-1] < evals[0], evals

    layout = JobLayout("acme", straight["job_id"])
    committed = json.loads(store.get_bytes(layout.step(16) + checkpoints.COMMITTED))
    names = {obj["key"][len(layout.step(16)):] for obj in committed["objects"]}
    assert {"model/adapter_config.json", "model/adapter_model.safetensors", "optimizer.pt"} <= names
    assert "model/model.safetensors" not in names  # the base is the init_from version's, never copied
    if mode != "ddp":  # replicas differ between averagings: each rank keeps its own adapter
        rank_state = torch.load(_download(store, layout.step(16) + "rank-00001.pt", tmp_path), weights_only=True)
        assert rank_state["model"] and all("lora_" in name for name in rank_state["model"])

    final = final_dir(straight_dir)
    assert {"config.json", "model.safetensors", "tokenizer.json", "adapter/adapter_config.json",
            "adapter/adapter_model.safetensors"} <= {p.relative_to(final).as_posix() for p in final.rglob("*")}

    resumed_dir, resumed = job_file(tmp_path / "b", manifest_key, base_prefix, mode=mode)
    first = launch(resumed_dir, settings_env, 2, "--stop-after-step", "6")
    assert first.returncode == 0, first.stderr[-4000:]
    assert checkpoints.committed_steps(store, JobLayout("acme", resumed["job_id"])) == [8]
    second = launch(resumed_dir, settings_env, 2, node_dir=resumed_dir / "other-node")
    assert second.returncode == 0, second.stderr[-4000:]

    resumed_events = read_events(resumed_dir)
    assert [e["resumed_from"] for e in resumed_events if e["event"] == "started"] == [None, 8]
    after = {e["step"]: e["loss"] for e in resumed_events if e["event"] == "train" and e["step"] > 8}
    reference = {e["step"]: e["loss"] for e in events if e["event"] == "train" and e["step"] > 8}
    assert after == reference and len(after) == 2
    for name in ("adapter/adapter_model.safetensors", "model.safetensors"):
        ours, theirs = load_file(final_dir(resumed_dir) / name), load_file(final / name)
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[key], theirs[key]) for key in ours), name


def _download(store, key: str, tmp_path: Path) -> Path:
    path = tmp_path / key.rsplit("/", 1)[-1]
    store.download(key, path)
    return path
