"""A canary rollout through the REST API: two trained, registered and exported versions of one model, v1
deployed, then `PUT /v1/deployments/{name}` with `canary.rollout`; under traffic from a few clients the
controller in the inference service advances the weight and promotes the canary by itself, and
`GET /v1/deployments/{name}` shows every step."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from cli.client import ApiError, Client

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SHAKESPEARE = Path(__file__).resolve().parents[3] / "shared" / "data" / "tinyshakespeare.txt"
NAME = "canary-e2e"  # dataset, model and deployment



def two_versions(client: Client) -> tuple[int, int]:
    """Two tiny GPT-2 versions of model NAME (a few steps each), both exported to ONNX."""
    dataset = client.upload("/v1/datasets", SHAKESPEARE.read_bytes()[:30_000],
                            query={"name": NAME, "tokenizer": "char", "format": "text"})
    client.wait_until(f"/v1/datasets/{NAME}/versions/{dataset['version']}",
                      lambda d: d["state"] == "READY", 120)
    jobs = [client.call("POST", "/v1/training-jobs", {
        "dataset": {"name": NAME, "version": dataset["version"]}, "model_name": NAME,
        "model": {"family": "gpt2", "n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 32, "dropout": 0.0},
        "hyperparameters": {"batch_size": 4, "max_steps": 2, "warmup_steps": 0, "eval_interval": 2,
                            "eval_batches": 1, "seed": seed, "precision": "fp32"},
        "distributed": {"mode": "ddp", "nproc_per_node": 1, "nnodes": 1},
    }) for seed in (1, 2)]
    versions = []
    for job in jobs:
        done = client.wait_until(f"/v1/training-jobs/{job['id']}",
                                 lambda j: j["state"] in {"SUCCEEDED", "FAILED", "CANCELLED"}, 240)
        assert done["state"] == "SUCCEEDED", done
        versions.append(done["model_version"]["version"])
    for version in versions:
        client.call("POST", f"/v1/models/{NAME}/versions/{version}/exports", {"format": "onnx"})
    for version in versions:
        shown = client.wait_until(f"/v1/models/{NAME}/versions/{version}",
                                  lambda v: any(e["format"] == "onnx" and e["state"] in {"READY", "FAILED"}
                                                for e in v.get("exports", [])), 240)
        assert [e["state"] for e in shown["exports"] if e["format"] == "onnx"] == ["READY"], shown
    stable, canary = sorted(versions)
    return stable, canary


class Traffic:
    """A few clients sending one-token sampled completions (never cached), noting the version that served."""

    def __init__(self, client: Client, workers: int = 3) -> None:
        self.client = client
        self.served: list[int] = []
        self.failed: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._work, daemon=True) for _ in range(workers)]
        for thread in self._threads:
            thread.start()

    def _work(self) -> None:
        while not self._stop.is_set():
            try:
                answer = self.client.call("POST", "/v1/completions", {"model": NAME, "prompt": "O", "max_tokens": 1,
                                                                      "temperature": 1.0})
                self.served.append(int(answer["system_fingerprint"].rsplit("-v", 1)[1]))
            except ApiError as error:
                self.failed.append(str(error))

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)


def test_a_canary_rollout_is_started_followed_and_promoted_through_rest(stack):
    client = stack.client()
    stable, canary = two_versions(client)
    path = f"/v1/deployments/{NAME}"
    client.call("PUT", path, {"model": NAME, "stable": stable}, headers={"If-None-Match": "*"})
    deployed = client.wait_until(path, lambda d: d["state"] in {"READY", "FAILED"}, 120)
    assert deployed["state"] == "READY" and deployed["rollout"] is None, deployed

    rollout = {"steps": [25, 100], "interval_s": 2, "min_requests": 5,
               # same-sized models on a shared machine: judge latency loosely (the rule: tests/integration/canary)
               "max_latency_ratio": 10, "latency_statistic": "mean"}
    with pytest.raises(ApiError) as invalid:  # must end at 100
        client.call("PUT", path, {"model": NAME, "stable": stable,
                                  "canary": {"version": canary, "rollout": {"steps": [25, 50]}}},
                    headers={"If-Match": deployed["etag"]})
    assert invalid.value.status in {400, 422}
    _, etag = client.call_with_etag(path)
    started = client.call("PUT", path, {"model": NAME, "stable": stable,
                                        "canary": {"version": canary, "rollout": rollout}}, headers={"If-Match": etag})
    assert started["canary"]["version"] == canary and started["canary"]["weight"] == 25
    assert started["rollout"]["state"] == "PROGRESSING" and started["rollout"]["policy"]["steps"] == [25, 100]
    assert started["rollout"]["policy"]["max_error_rate_delta"] == 0.02  # not given: the default

    traffic = Traffic(client)
    seen_states = []
    try:
        final = client.wait_until(path, lambda d: seen_states.append(d["rollout"]["state"])
                                  or d["rollout"]["state"] != "PROGRESSING", 60)
        time.sleep(0.5)  # a few requests after the promotion
    finally:
        traffic.stop()

    assert seen_states[0] == "PROGRESSING"
    assert final["rollout"]["state"] == "PROMOTED", final["rollout"]
    assert final["stable"] == canary and final["canary"] is None and final["state"] == "READY"
    events = final["rollout"]["events"]
    assert [(e["kind"], e["from_weight"], e["to_weight"]) for e in events] == [
        ("STARTED", 0, 25), ("PROMOTED", 25, 100)]
    assert events[-1]["observed"]["canary"]["requests"] >= 5 and events[-1]["observed"]["canary"]["errors"] == 0
    assert traffic.failed == []
    assert {stable, canary} <= set(traffic.served) and traffic.served[-1] == canary

    shown, etag = client.call_with_etag(path)
    assert shown == final and etag == final["etag"]  # one quoted strong tag, covering the rollout
    listed = {d["name"]: d for d in client.call("GET", "/v1/deployments")["deployments"]}
    assert listed[NAME]["rollout"]["state"] == "PROMOTED"
