"""Training through the gateway of a real stack: a char-level GPT-2 on the whole of tinyshakespeare
learns far more than character frequencies; its curves, events, idempotent submit and cancel.

The yardstick is the unigram loss: the cross-entropy (nats) of predicting every token of the train
split by its frequency alone, computed here from the train shards the dataset service wrote to S3.
"""

from __future__ import annotations

import json
import logging
import math
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from cli.client import Client
from services.common.config import Settings
from services.common.s3 import ObjectStore

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
log = logging.getLogger(__name__)

SHAKESPEARE = Path(__file__).resolve().parents[3] / "shared" / "data" / "tinyshakespeare.txt"
DATASET = "shakespeare"  # the same name and options as test_dataset_flow.py: one ingest serves both
MODEL = "shakespeare-quality"
# ~0.4M parameters, 2,048 tokens a step, 180 steps: well under a minute of training on two idle CPU cores.
QUALITY_JOB = {
    "model": {"family": "gpt2", "n_layer": 2, "n_head": 4, "n_embd": 128, "block_size": 64, "dropout": 0.0},
    "hyperparameters": {"batch_size": 32, "max_steps": 180, "learning_rate": 4e-3, "min_learning_rate": 4e-4,
                        "warmup_steps": 20, "eval_interval": 60, "eval_batches": 8, "log_interval": 10,
                        "seed": 1337, "precision": "fp32"},
    "distributed": {"mode": "ddp", "nproc_per_node": 1, "nnodes": 1},
    "model_name": MODEL,
}


def submit(client: Client, body: dict, key: str) -> tuple[int, dict]:
    """POST /v1/training-jobs with an Idempotency-Key; the status code matters (202 new, 200 existing)."""
    request = urllib.request.Request(
        client.base_url + "/v1/training-jobs", data=json.dumps(body).encode(), method="POST",
        headers={"Authorization": f"Bearer {client.key}", "Content-Type": "application/json",
                 "Idempotency-Key": key})
    with urllib.request.urlopen(request, timeout=60) as response:
        return response.status, json.loads(response.read())



def ready_dataset(client: Client) -> dict:
    created = client.upload("/v1/datasets", SHAKESPEARE, query={"name": DATASET, "tokenizer": "char"})
    return client.wait_until(f"/v1/datasets/{DATASET}/versions/{created['version']}",
                             lambda v: v["state"] != "PENDING", 600)


def unigram_loss(store: ObjectStore, version: dict) -> float:
    """Entropy (nats) of the train split's token frequencies: the loss of a model that ignores context."""
    counts = np.zeros(version["tokenizer"]["vocab_size"], dtype=np.int64)
    train_keys = [obj["key"] for obj in version["manifest"]["objects"] if "/train/shard-" in obj["key"]]
    assert train_keys, version["manifest"]
    dtype = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}[version["tokenizer"]["dtype"]]
    for key in train_keys:
        tokens = np.frombuffer(store.get_bytes(key), dtype=dtype)
        counts[: tokens.max() + 1] += np.bincount(tokens)
    assert counts.sum() == version["splits"]["train"]["tokens"]
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def test_a_real_run_learns_far_more_than_character_frequencies(stack):
    client = stack.client()
    version = ready_dataset(client)
    assert version["state"] == "READY", version
    unigram = unigram_loss(ObjectStore(Settings.from_env(stack.env).s3), version)
    assert 3.0 < unigram < 3.6, unigram  # English characters: about 4.8 bits

    body = {"dataset": {"name": DATASET, "version": version["version"]}, **QUALITY_JOB}
    key = f"quality-{version['version']}"
    status, job = submit(client, body, key)
    assert status == 202 and job["state"] in {"QUEUED", "RUNNING"}, (status, job)
    again_status, again = submit(client, body, key)  # a retried submit: the same job, not a second one
    assert (again_status, again["id"]) == (200, job["id"])
    listed = client.call("GET", "/v1/training-jobs", query={"page_size": 1000})["jobs"]
    assert [j["id"] for j in listed if j["idempotency_key"] == key] == [job["id"]]

    # The SSE stream follows the job live and ends with the event that made it final.
    patient = Client(client.base_url, client.key, timeout=600)
    events = list(patient.events(f"/v1/training-jobs/{job['id']}/events"))
    sequences = [event["sequence"] for event in events]
    assert sequences == sorted(set(sequences)) and len(events) > 10
    states = [event["state_changed"]["state"] for event in events if event.get("state_changed")]
    assert "RUNNING" in states and states[-1] == "SUCCEEDED", states
    assert events[-1].get("state_changed", {}).get("state") == "SUCCEEDED", events[-1]
    assert any(event.get("metrics", {}).get("values", {}).get("train_loss") for event in events)

    finished = client.call("GET", f"/v1/training-jobs/{job['id']}")
    assert finished["state"] == "SUCCEEDED" and finished["model_version"]["name"] == MODEL, finished
    assert finished["progress"]["done"] == QUALITY_JOB["hyperparameters"]["max_steps"]

    # Every log interval and every evaluation has its point (a step appears twice only if a lost
    # worker's job was resumed from a checkpoint: a busy machine may let a lease lapse).
    curves = client.call("GET", f"/v1/training-jobs/{job['id']}/metrics")
    train_steps = [point["step"] for point in curves["train_loss"]]
    assert sorted(set(train_steps)) == list(range(10, 181, 10)), train_steps
    validation = curves["validation_loss"]
    assert sorted({point["step"] for point in validation}) == [60, 120, 180], validation
    assert curves["train_loss"][-1]["value"] < curves["train_loss"][0]["value"]
    assert validation[-1]["value"] < validation[0]["value"]
    final = validation[-1]["value"]
    log.info("validation loss %.3f, unigram loss %.3f (ratio %.2f), test loss %.3f", final, unigram, final / unigram,
             curves["final"]["test_loss"])
    assert final < 0.75 * unigram, f"validation loss {final:.3f} vs unigram {unigram:.3f}"
    assert math.isfinite(curves["final"]["test_loss"]) and curves["final"]["test_loss"] < 0.8 * unigram

    registered = client.call("GET", f"/v1/models/{MODEL}/versions/{finished['model_version']['version']}")
    assert registered["lineage"]["dataset"] == {"name": DATASET, "version": version["version"]}


def test_cancel_stops_a_running_job_within_seconds(stack):
    client = stack.client()
    version = ready_dataset(client)
    body = {"dataset": {"name": DATASET, "version": version["version"]}, "model_name": "shakespeare-cancelled",
            "model": {"family": "gpt2", "n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 32},
            "hyperparameters": {"batch_size": 4, "max_steps": 1_000_000, "log_interval": 2, "eval_interval": 100_000,
                                "warmup_steps": 0, "seed": 7}}
    status, job = submit(client, body, f"cancel-{version['version']}")
    assert status == 202
    path = f"/v1/training-jobs/{job['id']}"
    # Cancel once torchrun is inside the training loop: its process group has to be stopped.
    client.wait_until(path, lambda j: j["state"] == "RUNNING" and (j.get("progress") or {}).get("done", 0) > 0, 600)

    asked = time.monotonic()
    answer = client.call("DELETE", path)
    assert answer["id"] == job["id"] and answer["state"] in {"RUNNING", "CANCELLED"}
    cancelled = client.wait_until(path, lambda j: j["state"] != "RUNNING", 60, pause=0.2)
    took = time.monotonic() - asked
    assert cancelled["state"] == "CANCELLED" and cancelled["model_version"] is None, cancelled
    assert took < 20, f"cancel took {took:.1f}s"
    assert cancelled["progress"]["done"] < body["hyperparameters"]["max_steps"]

    events = list(client.events(f"{path}/events"))  # a final job: its log, then the end of the stream
    assert events[-1]["state_changed"]["state"] == "CANCELLED", events[-1]
