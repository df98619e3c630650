"""Issue 9, item 8: every route × every role × two tenants: no cross-tenant read or write, no role
escalation, no protected field settable."""

from __future__ import annotations

import re
import time

import pytest

from gateway import routes

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

TABLE = routes.all_routes()
PROTECTED = [route for route in TABLE if route.roles]
PUBLIC = [route for route in TABLE if not route.roles]
ROLES = ("admin", "developer", "inference")
TENANTS = ("acme", "globex")


def concrete(path: str) -> str:
    return re.sub(r"{(\w+)}", lambda m: "1" if m.group(1) in {"version", "id"} else "rel-none", path)


@pytest.mark.parametrize("route", PUBLIC, ids=lambda r: f"{r.method} {r.path}")
def test_public_routes_need_no_key(stack, route):
    assert stack.http(route.method, route.path, key="").status_code in {200, 503}


@pytest.mark.parametrize("key", ["", "garbage", "llmp_nope_nope", "Bearer", "llmp_" + "a" * 5000])
@pytest.mark.parametrize("route", PROTECTED, ids=lambda r: f"{r.method} {r.path}")
def test_protected_routes_refuse_missing_or_unknown_keys(stack, route, key):
    response = stack.http(route.method, concrete(route.path), key=key, json={} if route.body else None)
    assert response.status_code == 401, (response.status_code, response.text[:200])
    error = response.json()["error"]
    if route.path.startswith("/openai/"):  # OpenAI's error shape: its type, and llmp's kind as the code
        assert (error["type"], error["code"]) == ("authentication_error", "unauthenticated"), error
    else:
        assert error["type"] == "unauthenticated", error


@pytest.mark.parametrize("tenant", TENANTS)
@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("route", PROTECTED, ids=lambda r: f"{r.method} {r.path}")
def test_every_route_every_role_every_tenant(stack, route, role, tenant):
    response = stack.http(route.method, concrete(route.path), key=stack.keys[(tenant, role)],
                          json={} if route.body else None)
    allowed = role == "admin" or role in route.roles
    if allowed:
        assert response.status_code not in {401, 403}, (response.status_code, response.text[:200])
        assert response.status_code < 500, (response.status_code, response.text[:200])
    else:
        assert response.status_code == 403, (response.status_code, response.text[:200])
        assert response.json()["error"]["type"] == "permission_denied"


def test_a_key_cannot_mint_a_stronger_one(stack):
    for tenant in TENANTS:
        for role in ("developer", "inference"):
            response = stack.http("POST", "/v1/api-keys", key=stack.keys[(tenant, role)],
                                  json={"tenant": tenant, "role": "admin"})
            assert response.status_code == 403
    listing = stack.http("GET", "/v1/api-keys").json()["api_keys"]
    assert all(key["name"].startswith("rel-") or key["role"] != "admin" for key in listing)


def test_a_revoked_key_stops_working(stack):
    created = stack.http("POST", "/v1/api-keys", json={"tenant": "acme", "role": "developer"}).json()
    assert stack.http("GET", "/v1/datasets", key=created["key"]).status_code == 200
    assert stack.http("DELETE", f"/v1/api-keys/{created['id']}").status_code == 204
    time.sleep(0.1)
    assert stack.http("GET", "/v1/datasets", key=created["key"]).status_code == 401


@pytest.mark.parametrize("route", [r for r in TABLE if r.body is not None], ids=lambda r: f"{r.method} {r.path}")
def test_no_body_can_set_a_protected_field(route):
    """Tenant, owner, state and ids come from the caller and the server, never from the body."""
    schema = route.body
    assert schema.get("additionalProperties") is False, f"{route.path}: unknown fields must be refused"
    if route.path == "/v1/api-keys":  # admin-only: choosing the tenant is the point of the route
        return
    forbidden = {"tenant", "owner", "created_by", "key_id", "role", "state", "id", "created_at"}
    assert not forbidden & set(schema.get("properties", {})), route.path


def test_no_cross_tenant_read_or_write(stack):
    acme, globex = stack.keys[("acme", "developer")], stack.keys[("globex", "developer")]
    created = stack.http("POST", "/v1/datasets", key=acme, params={"name": "rel-tenancy", "tokenizer": "char"},
                         data=b"".join(b"line %d of acme's private corpus\n" % i for i in range(200)))
    assert created.status_code in {200, 201, 202}, created.text
    version = created.json()["version"]
    mine = f"/v1/datasets/rel-tenancy/versions/{version}"
    deadline = time.monotonic() + 60
    while stack.http("GET", mine, key=acme).json()["state"] == "PENDING" and time.monotonic() < deadline:
        time.sleep(0.5)
    assert stack.http("GET", mine, key=acme).status_code == 200
    for key in (globex, stack.keys[("globex", "admin")]):  # another tenant, even its admin, sees nothing
        assert stack.http("GET", "/v1/datasets/rel-tenancy", key=key).status_code == 404
        assert stack.http("GET", mine, key=key).status_code == 404
        names = {d["name"] for d in stack.http("GET", "/v1/datasets", key=key).json()["datasets"]}
        assert "rel-tenancy" not in names
        assert stack.http("DELETE", mine, key=key).status_code == 404
        job = {"dataset": {"name": "rel-tenancy", "version": version},
               "model": {"family": "gpt2", "n_layer": 1, "n_head": 1, "n_embd": 8, "block_size": 8},
               "hyperparameters": {"max_steps": 1, "warmup_steps": 0},
               "distributed": {"mode": "ddp", "nproc_per_node": 1}}
        theirs = stack.http("POST", "/v1/training-jobs", key=key, json=job)
        nobody = stack.http("POST", "/v1/training-jobs", key=key,
                            json={**job, "dataset": {"name": "rel-never-was", "version": version}})
        assert theirs.status_code == nobody.status_code in {404, 422}  # indistinguishable from nonexistent
        assert theirs.json()["error"]["message"] == nobody.json()["error"]["message"].replace("rel-never-was",
                                                                                              "rel-tenancy")
    assert stack.http("GET", mine, key=acme).status_code == 200  # the failed delete changed nothing
    names = {d["name"] for d in stack.http("GET", "/v1/datasets", key=acme).json()["datasets"]}
    assert "rel-tenancy" in names
