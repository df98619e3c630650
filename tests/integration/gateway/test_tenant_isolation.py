"""Issue 7, item 9: another tenant's object is 404 on every route that names one — indistinguishable from
an object that does not exist — and the attempt changes nothing.

The route table is walked: every route whose path names an object must have a case in `CASES`, so a new
route without one fails `test_every_route_naming_an_object_has_an_isolation_case`. Tenant `alpha` owns
a READY dataset version (conftest.py), a training job (the training service in-process, on a private
broker no worker reads, so the job stays QUEUED), a model version with an alias (the registry
in-process; the version registered from a minimal save_pretrained folder) and an API key. Tenant
`beta`, as developer and as admin, then tries every route on them, and on a name nobody has.
The inference service runs in-process too (without Triton: what isolation needs of it is the registry).
"""

from __future__ import annotations

import json
import re
import uuid

import grpc
import pytest
from llmp.common.v1 import common_pb2
from llmp.registry.v1 import registry_pb2

from gateway import routes
from services.common import topology
from services.common.config import Settings
from services.common.s3 import ObjectStore
from tests import identities

pytestmark = pytest.mark.integration

MISSING = "nobody-has-this"
NO_ID = "00000000-0000-4000-8000-000000000000"

# (method, path) -> (the request body, or None; extra headers). Path placeholders are filled with
# alpha's objects, or with MISSING for the "does not exist" twin of each request.
CASES: dict[tuple[str, str], tuple[dict | None, dict[str, str]]] = {
    ("GET", "/v1/datasets/{name}"): (None, {}),
    ("GET", "/v1/datasets/{name}/versions/{version}"): (None, {}),
    ("GET", "/v1/datasets/{name}/versions/{version}/events"): (None, {}),
    ("DELETE", "/v1/datasets/{name}/versions/{version}"): (None, {}),
    ("GET", "/v1/training-jobs/{id}"): (None, {}),
    ("DELETE", "/v1/training-jobs/{id}"): (None, {}),
    ("GET", "/v1/training-jobs/{id}/metrics"): (None, {}),
    ("GET", "/v1/training-jobs/{id}/events"): (None, {}),
    ("GET", "/v1/models/{name}"): (None, {}),
    ("GET", "/v1/models/{name}/versions/{version}"): (None, {}),
    ("DELETE", "/v1/models/{name}/versions/{version}"): (None, {}),
    ("GET", "/v1/models/{name}/aliases/{alias}"): (None, {}),
    ("PUT", "/v1/models/{name}/aliases/{alias}"): ({"version": 1}, {"If-Match": "*"}),
    ("GET", "/v1/models/{name}/aliases/{alias}/history"): (None, {}),
    ("POST", "/v1/models/{name}/versions/{version}/exports"): ({"format": "onnx"}, {}),
    ("GET", "/v1/deployments/{name}"): (None, {}),
    ("GET", "/v1/deployments/{name}/metrics"): (None, {}),
    ("PUT", "/v1/deployments/{name}"): ({"model": "{model}", "stable": 1}, {"If-None-Match": "*"}),
    ("DELETE", "/v1/deployments/{name}"): (None, {}),
    ("DELETE", "/v1/api-keys/{key_id}"): (None, {}),
    ("GET", "/v1/models/{name}/versions/{version}/download"): (None, {}),
    ("GET", "/v1/models/{name}/imports/{version}"): (None, {}),
    ("GET", "/v1/models/{name}/aliases/{alias}/gate"): (None, {}),
    ("PUT", "/v1/models/{name}/aliases/{alias}/gate"): (
        {"dataset": {"name": "{model}", "version": 1}, "split": "test", "metric": "loss", "max_regression": 0.02},
        {}),
    # Evaluations are jobs of another kind in the same tenant-scoped table: alpha's job id is no evaluation of
    # beta's, the way a missing id is none.
    ("GET", "/v1/evaluations/{id}"): (None, {}),
    ("DELETE", "/v1/evaluations/{id}"): (None, {}),
    # OpenAI's models are deployments, answered in OpenAI's error shape (its `code` says model_not_found).
    ("GET", "/openai/v1/models/{model}"): (None, {}),
}
# Routes whose path names an object in the caller's own namespace, to be created there: beta importing a
# model named like alpha's creates beta's own model, so there is nothing of alpha's to be refused.
OWN_NAMESPACE = {("POST", "/v1/models/{name}/imports")}


def naming_routes() -> set[tuple[str, str]]:
    """Every served route whose path names an object (HEAD included: it is the GET's twin)."""
    from gateway.app import _with_head

    return {(route.method, route.path) for route in _with_head(routes.all_routes())
            if "{" in route.path and route.tag != "console"}


def test_every_route_naming_an_object_has_an_isolation_case():
    uncovered = {(method, path) for method, path in naming_routes()
                 if method != "HEAD" and (method, path) not in CASES and (method, path) not in OWN_NAMESPACE}
    assert not uncovered, f"routes without a tenant-isolation case in CASES: {sorted(uncovered)}"
    assert set(CASES) <= naming_routes(), "CASES names a route the table no longer has"


@pytest.fixture
async def world(gateway, settings_env, private_broker_url):
    """alpha's objects beyond its dataset version: a training job, a model version with alias `prod`,
    an API key; the registry, training and inference services in-process."""
    from services.inference import server as inference_server
    from services.registry import server as registry_server
    from services.training import server as training_server

    settings = Settings.from_env({**settings_env, "LLMP_BROKER_URL": private_broker_url})
    registry = await registry_server.build(settings)
    await registry.app.start(settings.listen_addr(topology.REGISTRY))
    training = await training_server.build(settings)
    await training.start(settings.listen_addr(topology.TRAINING))
    inference, _ = await inference_server.build(settings)
    await inference.start(settings.listen_addr(topology.INFERENCE))
    developer, job_id = gateway.auth("alpha", "developer"), None
    try:
        alpha = gateway.tenants["alpha"]
        name, version = gateway.dataset.rsplit("/", 3)[1], int(gateway.dataset.rsplit("/", 1)[1])
        job = await gateway.client.post("/v1/training-jobs", headers=developer, json={
            "dataset": {"name": name, "version": version},
            "model": {"family": "gpt2", "n_layer": 1, "n_head": 1, "n_embd": 8, "block_size": 8},
            "hyperparameters": {"max_steps": 1, "warmup_steps": 0},
            "distributed": {"mode": "ddp", "nproc_per_node": 1}})
        assert job.status == 202, await job.text()
        job_id = (await job.json())["id"]

        model = f"iso-{uuid.uuid4().hex[:6]}"
        store = ObjectStore(settings.s3)
        prefix = f"jobs/{alpha}/{job_id}/final/"
        store.put_bytes(prefix + "config.json", json.dumps({"model_type": "gpt2"}).encode())
        store.put_bytes(prefix + "model.safetensors", b"weights")
        async with grpc.aio.insecure_channel(settings_env["LLMP_REGISTRY_ADDR"]) as channel:
            register = channel.unary_unary(
                "/llmp.registry.v1.RegistryService/RegisterModelVersion",
                request_serializer=registry_pb2.RegisterModelVersionRequest.SerializeToString,
                response_deserializer=registry_pb2.RegisterModelVersionResponse.FromString)
            await register(registry_pb2.RegisterModelVersionRequest(
                model_name=model, source_prefix=prefix, metrics={"validation_loss": 1.0},
                lineage=registry_pb2.Lineage(dataset=common_pb2.DatasetRef(name=name, version=version),
                                             training_job_id=job_id)),
                metadata=identities.metadata(alpha, "registry", key_id="iso"))
        alias = await gateway.client.put(f"/v1/models/{model}/aliases/prod", json={"version": 1},
                                         headers={**developer, "If-None-Match": "*"})
        assert alias.status in {200, 201}, await alias.text()
        key_id = gateway.keys[("alpha", "inference")].split("_")[1]
        yield {"name": name, "version": str(version), "id": job_id, "model": model, "alias": "prod",
               "key_id": key_id}
    finally:
        if job_id is not None:  # the session's database is shared: a QUEUED job left behind would be claimed
            # by the next test's worker in place of that test's own job
            await gateway.client.delete(f"/v1/training-jobs/{job_id}", headers=developer)
        await inference.stop()
        await training.stop()
        await registry.app.stop()


def _fill(path: str, objects: dict[str, str], missing: bool) -> str:
    def value(match: re.Match) -> str:
        placeholder = match.group(1)
        if missing:  # the same version and alias: only the object's name or id differs
            if placeholder in {"version", "alias"}:
                return objects[placeholder]
            return NO_ID if placeholder == "id" else MISSING
        if placeholder == "name" and path.startswith("/v1/models"):
            return objects["model"]
        if placeholder == "name" and path.startswith("/v1/deployments"):
            return objects["model"]  # a deployment named like alpha's model: beta has no such thing either
        return objects[placeholder]

    return re.sub(r"{(\w+)}", value, path)


async def test_another_tenants_object_is_404_on_every_route(gateway, world):
    client = gateway.client
    alpha = gateway.auth("alpha", "developer")
    # alpha sees each of its objects (so a 404 below is isolation, not absence)
    for path in (gateway.dataset, f"/v1/training-jobs/{world['id']}", f"/v1/models/{world['model']}/versions/1",
                 f"/v1/models/{world['model']}/aliases/prod", f"/v1/models/{world['model']}/aliases/prod/history"):
        seen = await client.get(path, headers=alpha)
        assert seen.status == 200, (path, seen.status, await seen.text())
    keys = await client.get("/v1/api-keys", headers=gateway.auth("alpha", "admin"))
    assert world["key_id"] in {key["id"] for key in (await keys.json())["api_keys"]}

    for (method, template), (body, headers) in CASES.items():
        for role in ("developer", "admin"):
            if template.startswith("/v1/api-keys") and role != "admin":
                continue  # admin-only route: a developer is 403 before any object is looked up
            beta = gateway.auth("beta", role)
            answers = []
            for missing in (False, True):
                payload = None if body is None else json.loads(
                    json.dumps(body).replace("{model}", MISSING if missing else world["model"]))
                answer = await client.request(method, _fill(template, world, missing), json=payload,
                                              headers={**beta, **headers})
                text = await answer.text()
                assert answer.status == 404, (method, template, role, missing, answer.status, text[:300])
                answers.append(json.loads(text)["error"])
            theirs, nobody = answers
            kind = "code" if template.startswith("/openai/") else "type"
            assert theirs[kind] == nobody[kind] and theirs[kind] in {"not_found", "model_not_found"}
            for placeholder in ("model", "name", "id", "key_id"):  # the same words about another name
                theirs["message"] = theirs["message"].replace(world[placeholder], "X")
            nobody["message"] = nobody["message"].replace(MISSING, "X").replace(NO_ID, "X")
            assert theirs["message"] == nobody["message"], (method, template, role, theirs, nobody)

    # nothing beta tried changed alpha's objects
    model = f"/v1/models/{world['model']}"
    for path in (gateway.dataset, f"{model}/versions/1", f"{model}/aliases/prod"):
        assert (await client.get(path, headers=alpha)).status == 200, path
    job = await (await client.get(f"/v1/training-jobs/{world['id']}", headers=alpha)).json()
    assert job["state"] == "QUEUED"
    keys = await client.get("/v1/api-keys", headers=gateway.auth("alpha", "admin"))
    assert all(key["revoked_at"] is None for key in (await keys.json())["api_keys"] if key["id"] == world["key_id"])
    assert (await client.get("/v1/datasets", headers=gateway.auth("alpha", "inference"))).status == 403  # still valid


async def test_api_keys_are_managed_per_tenant(gateway):
    client = gateway.client
    beta_admin = gateway.auth("beta", "admin")
    listed = await (await client.get("/v1/api-keys", headers=beta_admin)).json()
    assert {key["tenant"] for key in listed["api_keys"]} == {gateway.tenants["beta"]}
    minted = await client.post("/v1/api-keys", headers=beta_admin,
                               json={"tenant": gateway.tenants["alpha"], "role": "admin"})
    assert minted.status == 403 and (await minted.json())["error"]["type"] == "permission_denied"
    own = await client.post("/v1/api-keys", headers=beta_admin, json={"tenant": gateway.tenants["beta"],
                                                                     "role": "developer"})
    assert own.status == 201
    created = await own.json()
    assert (await client.delete(f"/v1/api-keys/{created['id']}", headers=gateway.auth("alpha", "admin"))).status == 404
    assert (await client.get("/v1/datasets", headers={"Authorization": f"Bearer {created['key']}"})).status == 200
    assert (await client.delete(f"/v1/api-keys/{created['id']}", headers=beta_admin)).status == 204
    assert (await client.get("/v1/datasets", headers={"Authorization": f"Bearer {created['key']}"})).status == 401
