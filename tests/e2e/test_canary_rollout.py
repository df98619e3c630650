"""Canary rollouts through the REST API on the `llmp up` stack: trained, registered and exported versions of
one model, v1 deployed, then `PUT /v1/deployments/{name}` with `canary.rollout`; under traffic from a few
clients the controller in the inference service advances the weight and promotes a healthy canary by
itself, or rolls back one whose requests fail, and `GET /v1/deployments/{name}` shows every step."""

from __future__ import annotations

import json
import threading
import time
from datetime import datetime
from pathlib import Path

import psycopg
import pytest
from psycopg.types.json import Jsonb

from cli.client import ApiError, Client
from services.common.config import Settings
from services.common.s3 import ObjectStore

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SHAKESPEARE = Path(__file__).resolve().parents[3] / "shared" / "data" / "tinyshakespeare.txt"
NAME = "canary-e2e"  # dataset, model and deployment
FAILING = "canary-e2e-failing"  # the deployment of the rollback test


@pytest.fixture(scope="module")
def versions(stack) -> tuple[int, int, int]:
    return three_versions(stack.client())


def three_versions(client: Client) -> tuple[int, int, int]:
    """Three tiny GPT-2 versions of model NAME (a few steps each), all exported to ONNX."""
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
    }) for seed in (1, 2, 3)]
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
    first, second, third = sorted(versions)
    return first, second, third


def break_onnx_export(stack, version: int) -> None:
    """Make the ONNX export of NAME v`version` a mis-export, as tests/integration/inference's v3:
    its decoder.json says one more dimension per attention head than the graph has, so Triton loads it but
    every decoding step fails. The registry's record of the file (SHA-256, size) is updated to match, as if
    the exporter had written it; nothing has deployed this version yet, so no one has it cached."""
    store = ObjectStore(Settings.from_env(stack.env).s3)
    with psycopg.connect(stack.env["LLMP_DATABASE_URL"], autocommit=True) as conn:
        export_id, artifacts = conn.execute(
            "SELECT id, artifacts FROM registry_exports WHERE name = %s AND version = %s AND format = 'onnx'",
            (NAME, version)).fetchone()
        decoder = next(a for a in artifacts if a["path"] == "exports/onnx/decoder.json")
        spec = json.loads(store.get_bytes(decoder["key"]))
        stored = store.put_bytes(decoder["key"], json.dumps({**spec, "head_dim": spec["head_dim"] + 1}).encode())
        decoder.update(sha256=stored.sha256, size=stored.size)
        conn.execute("UPDATE registry_exports SET artifacts = %s WHERE id = %s", (Jsonb(artifacts), export_id))


class Traffic:
    """A few clients sending one-token sampled completions (never cached), noting the version that served."""

    PACE_S = 0.02

    def __init__(self, client: Client, deployment: str = NAME, workers: int = 3) -> None:
        self.client, self.deployment = client, deployment
        self.served: list[int] = []
        self.failed: list[str] = []
        # (wall-clock time the request was sent, version; None: failed). Sent, not answered: the version is chosen
        # when a request arrives, and one sent to the canary just before its rollback may fail a while after it.
        self.timeline: list[tuple[float, int | None]] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._work, daemon=True) for _ in range(workers)]
        for thread in self._threads:
            thread.start()

    def _work(self) -> None:
        # Paced (at least PACE_S apart per client): unpaced, three clients of a one-token model outran the tenant's
        # request quota (LLMP_TENANT_RATE_LIMIT) and their 429s were counted as the canary's failures.
        while not self._stop.wait(self.PACE_S):
            sent = time.time()
            try:
                answer = self.client.call("POST", "/v1/completions", {
                    "model": self.deployment, "prompt": "O", "max_tokens": 1, "temperature": 1.0})
                version = int(answer["system_fingerprint"].rsplit("-v", 1)[1])
                self.served.append(version)
                self.timeline.append((sent, version))
            except ApiError as error:
                self.failed.append(str(error))
                self.timeline.append((sent, None))

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)


def test_a_canary_rollout_is_started_followed_and_promoted_through_rest(stack, versions):
    client = stack.client()
    stable, canary, _ = versions
    path = f"/v1/deployments/{NAME}"
    client.call("PUT", path, {"model": NAME, "stable": stable}, headers={"If-None-Match": "*"})
    deployed = client.wait_until(path, lambda d: d["state"] in {"READY", "FAILED"}, 120)
    assert deployed["state"] == "READY" and deployed["rollout"] is None, deployed

    rollout = {"steps": [25, 100], "interval_s": 2, "min_requests": 5,
               # same-sized models on a shared machine: judge latency loosely (the rule: tests/unit/inference)
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


def test_a_failing_canary_is_rolled_back_by_itself_alias_unchanged(stack, versions):
    """A canary whose every request fails: rolled back (weight 0, the version kept on record) well within its
    step's interval, the model's alias untouched, the rollback in the deployment's history."""
    client = stack.client()
    stable, _, broken = versions
    break_onnx_export(stack, broken)
    alias = f"/v1/models/{NAME}/aliases/production"
    client.call("PUT", alias, {"version": stable, "reason": "before the canary"}, headers={"If-None-Match": "*"})
    alias_before = client.call_with_etag(alias)
    path = f"/v1/deployments/{FAILING}"
    client.call("PUT", path, {"model": NAME, "stable": stable}, headers={"If-None-Match": "*"})
    deployed = client.wait_until(path, lambda d: d["state"] in {"READY", "FAILED"}, 120)
    assert deployed["state"] == "READY", deployed

    rollout = {"steps": [25, 100], "interval_s": 60, "min_requests": 5, "max_error_rate_delta": 0.1}
    _, etag = client.call_with_etag(path)
    clock = time.monotonic()
    started = client.call("PUT", path, {"model": NAME, "stable": stable,
                                        "canary": {"version": broken, "rollout": rollout}}, headers={"If-Match": etag})
    assert started["canary"] == {"version": broken, "weight": 25}, started  # loading; served once Triton has it
    traffic = Traffic(client, FAILING)
    try:
        final = client.wait_until(path, lambda d: d["rollout"]["state"] != "PROGRESSING", 60)
        rolled_back_after = time.monotonic() - clock
        time.sleep(1.5)  # requests after the rollback
    finally:
        traffic.stop()

    assert final["rollout"]["state"] == "ROLLED_BACK" and final["rollout"]["weight"] == 0, final["rollout"]
    assert rolled_back_after < rollout["interval_s"]  # judged on errors as soon as enough requests came in
    assert "error rate 100.0%" in final["rollout"]["reason"]
    assert final["stable"] == stable and final["canary"] == {"version": broken, "weight": 0}
    events = final["rollout"]["events"]
    assert [(e["kind"], e["from_weight"], e["to_weight"]) for e in events] == [
        ("STARTED", 0, 25), ("ROLLED_BACK", 25, 0)]
    observed = events[-1]["observed"]
    assert observed["canary"]["requests"] >= 5 and observed["canary"]["error_rate"] == 1.0
    assert observed["stable"]["errors"] == 0
    assert client.call_with_etag(alias) == alias_before  # the alias, and its ETag, unchanged
    history = client.call("GET", alias + "/history")["entries"]
    assert [(entry["from_version"], entry["to_version"]) for entry in history] == [(0, stable)], history

    # Clients saw the canary fail, and only until the rollback; afterwards stable served them all.
    rolled_back_at = datetime.fromisoformat(events[-1]["at"]).timestamp()
    assert traffic.failed and set(traffic.served) == {stable}
    assert all(at < rolled_back_at + 1.0 for at, version in traffic.timeline if version is None)
    after = [version for at, version in traffic.timeline if at > rolled_back_at + 1.0]
    assert after and set(after) == {stable}


def test_streamed_completions_through_the_gateway_equal_the_whole_answer(stack, versions):
    """`POST /v1/completions` with `stream: true`: OpenAI-style SSE chunks whose text joins into exactly the
    non-streamed (greedy) answer, usage on the last chunk, then `data: [DONE]`."""
    import requests

    client = stack.client()
    path = "/v1/deployments/stream-e2e"
    client.call("PUT", path, {"model": NAME, "stable": versions[0]}, headers={"If-None-Match": "*"})
    assert client.wait_until(path, lambda d: d["state"] in {"READY", "FAILED"}, 120)["state"] == "READY"
    body = {"model": "stream-e2e", "prompt": "ROMEO:", "max_tokens": 12, "temperature": 0}
    whole = client.call("POST", "/v1/completions", body)
    url = f"http://127.0.0.1:{stack.env['LLMP_GATEWAY_PORT']}/v1/completions"
    with requests.post(url, json={**body, "stream": True}, stream=True, timeout=60,
                       headers={"Authorization": f"Bearer {stack.admin_key}"}) as streamed:
        assert streamed.status_code == 200 and streamed.headers["Content-Type"].startswith("text/event-stream")
        frames = [line for line in streamed.iter_lines() if line]
    assert frames[-1] == b"data: [DONE]" and all(frame.startswith(b"data: ") for frame in frames)
    chunks = [json.loads(frame[6:]) for frame in frames[:-1]]
    assert len(chunks) >= 2 and all(chunk["object"] == "text_completion" for chunk in chunks)
    assert "".join(chunk["choices"][0]["text"] for chunk in chunks) == whole["choices"][0]["text"]
    assert chunks[-1]["usage"] == whole["usage"] and chunks[-1]["choices"][0]["finish_reason"] == "length"
    client.call("DELETE", path)
