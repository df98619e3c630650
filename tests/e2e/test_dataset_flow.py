"""The dataset issue end to end: the whole of tinyshakespeare through the gateway into the stack's
real PostgreSQL and S3, idempotent re-ingest, a failed ingest that leaves nothing, and a version
that cannot be deleted while a model's lineage points at it."""

from __future__ import annotations

import hashlib
import json
import urllib.parse
import urllib.request
from pathlib import Path

import psycopg
import pytest

from cli.client import ApiError, Client
from services.common.config import Settings
from services.common.s3 import ObjectStore

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SHAKESPEARE = Path(__file__).resolve().parents[3] / "shared" / "data" / "tinyshakespeare.txt"
DATASET = "shakespeare"  # the same name and options as test_training_quality.py: one ingest serves both
QUERY = {"name": DATASET, "tokenizer": "char"}
SPLITS = {"train", "validation", "test", "calibration"}


def upload(client: Client, data: bytes, query: dict) -> tuple[int, dict]:
    """POST /v1/datasets; the status code matters (202 new and building, 200 the same corpus again)."""
    url = client.base_url + "/v1/datasets?" + urllib.parse.urlencode(query)
    request = urllib.request.Request(url, data=data, method="POST", headers={
        "Authorization": f"Bearer {client.key}", "Content-Type": "text/plain"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return response.status, json.loads(response.read())



def rows(stack, tenant: str) -> list[tuple]:
    with psycopg.connect(stack.env["LLMP_DATABASE_URL"]) as conn:
        return conn.execute("SELECT version, state, digest FROM dataset_versions WHERE tenant = %s AND name = %s "
                            "ORDER BY version", (tenant, DATASET)).fetchall()


def test_tinyshakespeare_through_the_gateway(stack):
    client = stack.client()
    store = ObjectStore(Settings.from_env(stack.env).s3)
    corpus = SHAKESPEARE.read_bytes()

    status, created = upload(client, corpus, QUERY)
    assert status in {200, 202}, created  # 200 when another e2e test ingested the same corpus first
    path = f"/v1/datasets/{DATASET}/versions/{created['version']}"
    version = client.wait_until(path, lambda v: v["state"] != "PENDING", 600)

    # READY, with statistics for every split and a character vocabulary.
    assert version["state"] == "READY" and not version.get("error"), version
    assert set(version["splits"]) == SPLITS
    splits = version["splits"]
    documents = sum(split["documents"] for split in splits.values())
    assert all(split["documents"] > 0 and split["tokens"] > split["documents"] for split in splits.values()), splits
    assert splits["train"]["documents"] > 0.8 * documents
    # Every character of the corpus is a token, and every document ends with one EOS.
    tokens = sum(split["tokens"] for split in splits.values())
    assert 0.9 * len(corpus) < tokens - documents <= len(corpus)
    assert version["tokenizer"]["kind"] == "char" and 60 < version["tokenizer"]["vocab_size"] < 80
    assert version["source_bytes"] == len(corpus)

    # The manifest lists every object of the version in S3, each with its true size and SHA-256.
    tenant = version["tenant"]
    prefix = f"datasets/{tenant}/{DATASET}/v{version['version']}/"
    objects = version["manifest"]["objects"]
    assert version["manifest"]["key"] == prefix + "manifest.json"
    assert {o["key"]: int(o["size"]) for o in objects} == {o.key: o.size for o in store.list(prefix)}
    for obj in objects:
        data = store.get_bytes(obj["key"])
        assert (len(data), hashlib.sha256(data).hexdigest()) == (int(obj["size"]), obj["sha256"]), obj["key"]
    manifest = json.loads(store.get_bytes(prefix + "manifest.json"))
    assert {name: split["tokens"] for name, split in manifest["splits"].items()} == \
        {name: split["tokens"] for name, split in splits.items()}
    # ... and PostgreSQL has the version READY, once.
    assert [(v, state) for v, state, _ in rows(stack, tenant)] == [(version["version"], "READY")]

    # The same corpus with the same options is the same version, not a new one.
    again_status, again = upload(client, corpus, QUERY)
    assert (again_status, again["version"], again["state"]) == (200, version["version"], "READY")
    assert again["digest"] == version["digest"]

    # Invalid UTF-8 past the first MiB (so the gateway has already streamed a chunk on): a 400 naming
    # the line, and nothing left behind: no version row, no object, the listings unchanged.
    listing = client.call("GET", "/v1/datasets")
    versions = client.call("GET", f"/v1/datasets/{DATASET}")
    cut = corpus.index(b"\n", 1_050_000) + 1
    broken = corpus[:cut] + b"caf\xe9 au lait\n" + corpus[cut:]
    with pytest.raises(ApiError) as refused:
        client.upload("/v1/datasets", broken, query=QUERY, content_type="text/plain")
    assert refused.value.status == 400 and refused.value.kind == "invalid_argument"
    line = corpus[:cut].count(b"\n") + 1
    assert f"line {line}:" in refused.value.message, refused.value.message
    assert client.call("GET", "/v1/datasets") == listing
    assert client.call("GET", f"/v1/datasets/{DATASET}") == versions
    assert [(v, state) for v, state, _ in rows(stack, tenant)] == [(version["version"], "READY")]
    assert store.list(f"datasets/{tenant}/{DATASET}/v{version['version'] + 1}/") == []

    # Once a model's lineage points at the version, deleting it is refused, and it stays whole.
    model = train_tiny_model(client, version["version"])
    with pytest.raises(ApiError) as conflict:
        client.call("DELETE", path)
    assert conflict.value.status == 409 and conflict.value.kind == "conflict"
    assert model in conflict.value.message, conflict.value.message
    assert client.call("GET", path)["state"] == "READY"
    assert len(store.list(prefix)) == len(objects)


def train_tiny_model(client: Client, dataset_version: int) -> str:
    """A two-step model trained on the version (its lineage points there); returns "name:version"."""
    job = client.call("POST", "/v1/training-jobs", {
        "dataset": {"name": DATASET, "version": dataset_version}, "model_name": "shakespeare-lineage",
        "model": {"family": "gpt2", "n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 32},
        "hyperparameters": {"batch_size": 4, "max_steps": 2, "warmup_steps": 0, "eval_interval": 2, "eval_batches": 1},
    }, headers={"Idempotency-Key": f"dataset-flow-lineage-{dataset_version}"})
    done = client.wait_until(f"/v1/training-jobs/{job['id']}", lambda j: j["state"] not in {"QUEUED", "RUNNING"},
                             600)
    assert done["state"] == "SUCCEEDED", done
    name, number = done["model_version"]["name"], done["model_version"]["version"]
    lineage = client.call("GET", f"/v1/models/{name}/versions/{number}")["lineage"]
    assert lineage["dataset"] == {"name": DATASET, "version": dataset_version}
    return f"{name}:{number}"
