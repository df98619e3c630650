"""Evaluations through the gateway of a real stack: two versions of a tiny model (one trained ten times
longer) measured on an external test set (purpose=evaluation, the model's tokenizer); the figures agree
with a bare `torch.no_grad()` loop over the same shards, and the better version shows it."""

from __future__ import annotations

import json
import math
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from cli.client import ApiError, Client
from services.common.config import Settings
from services.common.s3 import ObjectStore

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SHAKESPEARE = Path(__file__).resolve().parents[3] / "shared" / "data" / "tinyshakespeare.txt"
MODEL = "eval-tiny"
TINY = {"family": "gpt2", "n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 32, "dropout": 0.0}


def post(client: Client, path: str, body: dict, key: str = "") -> tuple[int, dict]:
    headers = {"Authorization": f"Bearer {client.key}", "Content-Type": "application/json"}
    if key:
        headers["Idempotency-Key"] = key
    request = urllib.request.Request(client.base_url + path, data=json.dumps(body).encode(), method="POST",
                                     headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def ready(client: Client, name: str, data: bytes, **query: str) -> dict:
    created = client.upload("/v1/datasets", data, query={"name": name, **query})
    version = client.wait_until(f"/v1/datasets/{name}/versions/{created['version']}",
                                lambda v: v["state"] != "PENDING", 600)
    assert version["state"] == "READY", version
    return version


def train(client: Client, dataset: dict, steps: int) -> int:
    body = {"dataset": {"name": dataset["name"], "version": dataset["version"]}, "model": TINY, "model_name": MODEL,
            "hyperparameters": {"batch_size": 8, "max_steps": steps, "learning_rate": 3e-3, "warmup_steps": 2,
                                "eval_interval": steps, "eval_batches": 1, "log_interval": steps, "seed": 7,
                                "precision": "fp32"},
            "distributed": {"mode": "ddp", "nproc_per_node": 1, "nnodes": 1}}
    status, job = post(client, "/v1/training-jobs", body)
    assert status == 202, job
    done = client.wait_until(f"/v1/training-jobs/{job['id']}", lambda j: j["state"] in {"SUCCEEDED", "FAILED"}, 900)
    assert done["state"] == "SUCCEEDED", done
    return int(done["model_version"]["version"])


def evaluate(client: Client, version: int, dataset: dict, key: str = "", **extra) -> dict:
    body = {"model": {"name": MODEL, "version": version},
            "dataset": {"name": dataset["name"], "version": dataset["version"]}, "split": "test", **extra}
    status, submitted = post(client, "/v1/evaluations", body, key)
    assert status == 202 and submitted["state"] in {"QUEUED", "RUNNING"}, submitted
    if key:  # a retried submit is the same evaluation
        again_status, again = post(client, "/v1/evaluations", body, key)
        assert (again_status, again["id"]) == (200, submitted["id"])
    done = client.wait_until(f"/v1/evaluations/{submitted['id']}",
                             lambda e: e["state"] in {"SUCCEEDED", "FAILED", "CANCELLED"}, 600)
    assert done["state"] == "SUCCEEDED", done
    return done


def bare_figures(store: ObjectStore, model_prefix: str, dataset: dict, folder: Path) -> dict[str, float]:
    """The figures of a plain no_grad loop: consecutive windows of the model's context over the test shards."""
    folder.mkdir(parents=True)
    for obj in store.list(model_prefix):
        name = obj.key[len(model_prefix):]
        if "/" not in name:
            store.download(obj.key, folder / name)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    dtype = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}[dataset["tokenizer"]["dtype"]]
    keys = sorted(obj["key"] for obj in dataset["manifest"]["objects"] if "/test/shard-" in obj["key"])
    tokens = np.concatenate([np.frombuffer(store.get_bytes(key), dtype=dtype) for key in keys]).astype(np.int64)
    block = model.config.n_positions
    loss, correct, count = 0.0, 0, 0
    bins_n, bins_conf, bins_hit = np.zeros(15), np.zeros(15), np.zeros(15)
    with torch.no_grad():
        for start in range(0, len(tokens) - 1, block):
            window = torch.from_numpy(tokens[start:start + block])[None]
            if window.shape[1] < 2:
                break
            logits = model(window).logits[0, :-1]
            target = window[0, 1:]
            probs = torch.softmax(logits.double(), -1)
            loss += float(torch.nn.functional.cross_entropy(logits, target, reduction="sum"))
            confidence, predicted = probs.max(-1)
            hit = (predicted == target).numpy()
            correct += int(hit.sum())
            count += len(target)
            for c, h in zip(confidence.numpy(), hit, strict=True):
                b = min(int(c * 15), 14)
                bins_n[b] += 1
                bins_conf[b] += c
                bins_hit[b] += h
    return {"loss": loss / count, "token_accuracy": correct / count, "tokens": count,
            "expected_calibration_error": float(np.abs(bins_hit - bins_conf).sum() / count)}


def test_two_versions_compared_on_an_external_test_set(stack, tmp_path):
    client = stack.client()
    text = SHAKESPEARE.read_text()
    training = ready(client, "eval-train", text[:60_000].encode(), tokenizer="char")
    weak, strong = train(client, training, 8), train(client, training, 80)

    # The external test set: text the training corpus never held, tokenized with the model's tokenizer.
    external = ready(client, "eval-external", text[-20_000:].encode(), purpose="evaluation", tokenizer="model",
                     tokenizer_model=MODEL, tokenizer_model_version=str(weak))
    assert {name: split["documents"] > 0 for name, split in external["splits"].items()} == \
        {"train": False, "validation": False, "test": True, "calibration": False}, external["splits"]

    first = evaluate(client, weak, external, key="eval-weak")
    second = evaluate(client, strong, external)
    for done in (first, second):
        figures = done["metrics"]
        assert set(figures) == {"loss", "perplexity", "token_accuracy", "expected_calibration_error", "tokens"}
        assert figures["tokens"] > 10_000 and math.isclose(figures["perplexity"], math.exp(figures["loss"]))
        assert 0 <= figures["expected_calibration_error"] <= 1 and 0 <= figures["token_accuracy"] <= 1
    assert second["metrics"]["loss"] < first["metrics"]["loss"] - 0.1, (first["metrics"], second["metrics"])
    assert second["metrics"]["token_accuracy"] > first["metrics"]["token_accuracy"]

    # The external set is clean; one cut from the training corpus is reported contaminated.
    for done in (first, second):
        assert done["contamination"]["datasets"] == [f"eval-train@{training['version']}"], done
        assert done["contamination"]["share"] < 0.05, done["contamination"]
    copied = ready(client, "eval-copied", text[:20_000].encode(), purpose="evaluation", tokenizer="model",
                   tokenizer_model=MODEL, tokenizer_model_version=str(weak))
    contaminated = evaluate(client, weak, copied)["contamination"]
    # About 90 % of those documents went to the train split (the rest to validation, test, calibration).
    assert 0.7 < contaminated["share"] <= 1 and contaminated["documents"] > 50, contaminated
    # Both sets of figures are reported; asked, the headline figures leave the contaminated documents out.
    assert contaminated["clean_metrics"]["tokens"] < contaminated["all_metrics"]["tokens"], contaminated
    if contaminated["contaminated"] < contaminated["documents"]:
        cleaned = evaluate(client, weak, copied, exclude_contaminated=True)
        assert cleaned["exclude_contaminated"] and cleaned["metrics"] == cleaned["contamination"]["clean_metrics"]
        assert cleaned["contamination"]["all_metrics"] == contaminated["all_metrics"]
    for done in (first, second):  # nothing contaminated: the two sets are the same
        assert done["contamination"]["clean_metrics"]["tokens"] <= done["metrics"]["tokens"]
        assert done["contamination"]["all_metrics"] == done["metrics"] and not done["exclude_contaminated"]

    # The figures are what a bare no_grad loop over the same shards finds.
    store = ObjectStore(Settings.from_env(stack.env).s3)
    registered = client.call("GET", f"/v1/models/{MODEL}/versions/{strong}")
    bare = bare_figures(store, registered["prefix"], external, tmp_path / "model")
    assert bare["tokens"] == second["metrics"]["tokens"]
    for name in ("loss", "token_accuracy", "expected_calibration_error"):
        assert math.isclose(second["metrics"][name], bare[name], rel_tol=1e-4, abs_tol=1e-5), (name, second, bare)

    # Listed by model and by version; a version shows its evaluations.
    by_model = client.call("GET", "/v1/evaluations", query={"model": MODEL})["evaluations"]
    assert {item["id"] for item in by_model} >= {first["id"], second["id"]}
    by_version = client.call("GET", "/v1/evaluations", query={"model": MODEL, "version": strong})["evaluations"]
    assert [item["id"] for item in by_version] == [second["id"]]

    # A dataset tokenized otherwise cannot measure this model: 422 naming the tokenizer.
    other = ready(client, "eval-other", text[100_000:120_000].upper().encode(), tokenizer="char")
    status, refused = post(client, "/v1/evaluations", {"model": {"name": MODEL, "version": strong},
                                                       "dataset": {"name": other["name"], "version": other["version"]}})
    assert status == 422 and "tokenizer" in refused["error"]["message"], refused

    # The CLI shows the versions side by side on the same data.
    listed = stack.llmp("eval", "list", MODEL)
    assert listed.returncode == 0, listed.stderr
    rows = [line.split() for line in listed.stdout.splitlines()[1:]]
    assert {(row[0], row[3]) for row in rows} >= {(first["id"], str(weak)), (second["id"], str(strong))}, listed.stdout


def move(client: Client, alias: str, version: int) -> tuple[int, dict]:
    try:
        return 200, client.put_conditionally(f"/v1/models/{MODEL}/aliases/{alias}", {"version": version})
    except ApiError as error:
        return error.status, {"message": error.message}


def test_a_gated_alias_moves_only_to_a_version_measured_no_worse(stack):
    client = stack.client()
    versions = client.call("GET", f"/v1/models/{MODEL}")["versions"]
    weak, strong = sorted(v["version"] for v in versions)[:2]  # trained 8 and 80 steps (the test above)
    external = client.call("GET", "/v1/datasets/eval-external/versions/1")
    assert move(client, "production", weak)[0] == 200  # created, ungated

    gate = {"dataset": {"name": "eval-external", "version": external["version"]}, "split": "all",
            "metric": "loss", "max_regression": 0.02}
    client.call("PUT", f"/v1/models/{MODEL}/aliases/production/gate", gate)
    assert client.call("GET", f"/v1/models/{MODEL}/aliases/production/gate")["metric"] == "loss"

    # Nothing measured on split "all" yet: the move waits, and the gate starts both evaluations.
    status, refused = move(client, "production", strong)
    assert status == 409 and "evaluation pending" in refused["message"], refused
    for version in (weak, strong):
        listed = client.wait_until(
            "/v1/evaluations?" + f"model={MODEL}&version={version}",
            lambda body: any(e["split"] == "all" and e["state"] == "SUCCEEDED" for e in body["evaluations"]), 600)
        assert listed

    status, moved = move(client, "production", strong)  # better: allowed
    assert status == 200 and moved["version"] == strong, moved
    status, refused = move(client, "production", weak)  # worse by far more than 2 %: refused, both figures named
    assert status == 409 and "gate refused" in refused["message"], refused
    assert f"version {weak} is" in refused["message"] and f"version {strong} (current)" in refused["message"]
    assert client.call("GET", f"/v1/models/{MODEL}/aliases/production")["version"] == strong

    history = client.call("GET", f"/v1/models/{MODEL}/aliases/production/history")["entries"]
    decisions = [(entry.get("decision"), entry["to_version"]) for entry in history]
    assert decisions == [("moved", weak), ("pending", strong), ("moved", strong), ("refused", weak)], history
    assert "gate passed" in history[2]["gate"] and "gate refused" in history[3]["gate"]


def test_a_canary_of_a_gated_alias_s_stable_must_pass_its_gate(stack):
    """A deployment whose stable is `production`'s target (gated on loss, after the test above): a canary of the
    worse version is refused with the gate's figures before any traffic reaches it, and the refusal is on
    record in the alias history; the deployment keeps serving its stable alone."""
    client = stack.client()
    weak, strong = sorted(v["version"] for v in client.call("GET", f"/v1/models/{MODEL}")["versions"])[:2]
    assert client.call("GET", f"/v1/models/{MODEL}/aliases/production")["version"] == strong
    path = "/v1/deployments/eval-gated"
    client.call("PUT", path, {"model": MODEL, "stable": strong}, headers={"If-None-Match": "*"})
    deployed = client.wait_until(path, lambda d: d["state"] in {"READY", "FAILED"}, 600)
    assert deployed["state"] == "READY", deployed

    _, etag = client.call_with_etag(path)
    with pytest.raises(ApiError) as refused:
        client.call("PUT", path, {"model": MODEL, "stable": strong,
                                  "canary": {"version": weak, "rollout": {"steps": [50, 100], "interval_s": 30}}},
                    headers={"If-Match": etag})
    assert refused.value.status == 409 and "gate refused" in str(refused.value), refused.value
    after = client.call("GET", path)
    assert after["stable"] == strong and after["canary"] is None and after["rollout"] is None, after
    history = client.call("GET", f"/v1/models/{MODEL}/aliases/production/history")["entries"]
    assert (history[-1].get("decision"), history[-1]["to_version"]) == ("refused", weak), history[-1]
    client.call("DELETE", path)
