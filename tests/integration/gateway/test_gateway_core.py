"""The gateway's own behaviour against real PostgreSQL: auth, roles, keys, errors, OpenAPI."""

import pytest

from gateway.app import init_app
from services.common.s3 import ObjectStore

pytestmark = pytest.mark.integration
ADMIN_KEY = "llmp_bootstrap_test-admin-secret"


@pytest.fixture
async def client(aiohttp_client, settings_env):
    from services.common.config import Settings

    settings = Settings.from_env({**settings_env, "LLMP_ADMIN_KEY": ADMIN_KEY, "LLMP_MAX_BODY_BYTES": "2048"})
    ObjectStore(settings.s3).ensure_bucket()  # what the services do at start
    return await aiohttp_client(init_app(settings))


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def test_liveness_and_openapi_are_public(client):
    response = await client.get("/healthz")
    assert response.status == 200 and (await response.json()) == {"status": "ok"}
    assert response.headers["X-Request-Id"]
    document = await (await client.get("/openapi.json")).json()
    assert document["openapi"].startswith("3.1")
    assert "/v1/api-keys" in document["paths"] and "post" in document["paths"]["/v1/api-keys"]


async def test_protected_routes_need_a_valid_key(client):
    assert (await client.get("/v1/api-keys")).status == 401
    response = await client.get("/v1/api-keys", headers=auth("llmp_nope_nope"))
    assert response.status == 401
    assert (await response.json())["error"]["type"] == "unauthenticated"
    assert (await client.get("/v1/api-keys", headers=auth(ADMIN_KEY))).status == 200


async def test_admin_creates_keys_with_roles_and_tenants(client):
    created = await client.post("/v1/api-keys", json={"tenant": "acme", "role": "developer", "name": "ci"},
                                headers=auth(ADMIN_KEY))
    assert created.status == 201
    key = (await created.json())["key"]
    # A developer may not manage keys.
    denied = await client.get("/v1/api-keys", headers=auth(key))
    assert denied.status == 403 and (await denied.json())["error"]["type"] == "permission_denied"
    listed = await (await client.get("/v1/api-keys", headers=auth(ADMIN_KEY))).json()
    row = next(item for item in listed["api_keys"] if item["tenant"] == "acme")
    assert "secret_sha256" not in row and "key" not in row  # the secret is never shown again
    assert (await client.delete(f"/v1/api-keys/{row['id']}", headers=auth(ADMIN_KEY))).status == 204
    assert (await client.delete(f"/v1/api-keys/{row['id']}", headers=auth(ADMIN_KEY))).status == 404


@pytest.mark.parametrize("body, status, kind", [
    (b"{not json", 400, "invalid_argument"),
    (b"[1, 2]", 400, "invalid_argument"),
    (b"\xff\xfe", 400, "invalid_argument"),
    (b'{"tenant": "acme", "role": "root"}', 422, "validation_failed"),
    (b'{"tenant": "acme", "role": "developer", "state": "READY"}', 422, "validation_failed"),
    (b'{"tenant": "acme", "role": "developer", "name": "' + b"x" * 4000 + b'"}', 413, "payload_too_large"),
])
async def test_bad_input_gets_the_right_4xx_and_one_error_shape(client, body, status, kind):
    response = await client.post("/v1/api-keys", data=body, headers={**auth(ADMIN_KEY),
                                                                      "Content-Type": "application/json"})
    assert response.status == status
    assert (await response.json())["error"]["type"] == kind


async def test_unknown_route_and_method_use_the_error_shape(client):
    missing = await client.get("/v1/nothing-here")
    assert missing.status == 404 and (await missing.json())["error"]["type"] == "not_found"
    wrong = await client.put("/healthz")
    assert wrong.status == 405 and "GET" in wrong.headers["Allow"]


async def test_get_has_etag_and_304(client):
    first = await client.get("/v1/api-keys", headers=auth(ADMIN_KEY))
    tag = first.headers["ETag"]
    again = await client.get("/v1/api-keys", headers={**auth(ADMIN_KEY), "If-None-Match": tag})
    assert again.status == 304 and again.headers["ETag"] == tag
    assert again.headers["Cache-Control"] == first.headers["Cache-Control"]


async def test_rate_limit_answers_429_with_retry_after(client):
    created = await client.post("/v1/api-keys", json={"tenant": "acme", "role": "inference", "rate_limit": 0.5},
                                headers=auth(ADMIN_KEY))
    key = (await created.json())["key"]
    statuses = []
    for _ in range(120):  # the burst allowance is 100 requests
        response = await client.get("/v1/api-keys", headers=auth(key))
        statuses.append(response.status)
        if response.status == 429:
            assert int(response.headers["Retry-After"]) >= 1
            break
    assert statuses[-1] == 429 and set(statuses[:-1]) == {403}


async def test_requests_no_route_takes_get_the_pipeline_and_the_allowed_methods(client):
    """The catch-all route (gateway.app.NO_ROUTE) answers what aiohttp would, 404 or 405 with the route's
    methods in Allow, with the error shape, a request id, nosniff and the `unmatched` metrics label."""
    from prometheus_client import REGISTRY

    def counted(method: str, status: str) -> float:
        labels = {"method": method, "route": "unmatched", "status": status}
        return REGISTRY.get_sample_value("llmp_http_requests_total", labels) or 0.0

    before = counted("PATCH", "405"), counted("GET", "404"), counted("OTHER", "404")
    wrong = await client.patch("/v1/datasets/some-name/versions/3", headers={"X-Request-Id": "catch-all-1"})
    assert wrong.status == 405 and (await wrong.json())["error"]["type"] == "invalid_argument"
    assert set(wrong.headers["Allow"].split(",")) == {"GET", "HEAD", "DELETE"}
    assert wrong.headers["X-Request-Id"] == "catch-all-1" and wrong.headers["X-Content-Type-Options"] == "nosniff"
    for path in ("/", "/v1", "/v1/datasets/x/y/z/w/v", "/v1/datasets/some-name/versions/3/"):
        response = await client.get(path) if path != "/" else await client.post(path)
        expected = 405 if path == "/" else 404
        assert response.status == expected, path
        assert (await response.json())["error"]["type"] == ("invalid_argument" if expected == 405 else "not_found")
        assert response.headers["X-Request-Id"]
    assert (await client.request("PROPFIND", "/coffee")).status == 404
    assert counted("PATCH", "405") - before[0] == 1
    assert counted("GET", "404") - before[1] == 3
    assert counted("OTHER", "404") - before[2] == 1
    # A route's own answers are not counted as unmatched.
    assert (await client.get("/healthz")).status == 200
    assert counted("GET", "404") - before[1] == 3
