"""The gateway's HTTP contract through the real app: conditional requests, HEAD, Cache-Control and Vary,
roles and tenants on every route of the table, fields a caller may not set, rate limits, SSE framing
and tracing. Real PostgreSQL, SeaweedFS and dataset service (see conftest.py)."""

import asyncio
import json
import re

import pytest
from prometheus_client import REGISTRY

from gateway import routes

pytestmark = pytest.mark.integration

ROLES = ("admin", "developer", "inference")


def concrete(path: str) -> str:
    """A route path with its placeholders filled in."""
    return re.sub(r"{(\w+)}", lambda m: "7" if m.group(1) == "version" else f"x-{m.group(1)}", path)


# -- conditional requests: strong/weak x GET/HEAD/DELETE x match/mismatch/* --------------------------

@pytest.mark.parametrize("method", ["GET", "HEAD"])
@pytest.mark.parametrize("condition, status", [
    ("{etag}", 304), ("W/{etag}", 304), ('"nope", {etag}', 304), ("*", 304), ('"nope"', 200), ('W/"nope"', 200),
])
async def test_if_none_match_on_get_and_head(gateway, method, condition, status):
    auth = gateway.auth("alpha", "developer")
    plain = await gateway.client.request(method, gateway.dataset, headers=auth)
    answer = await gateway.client.request(method, gateway.dataset,
                                          headers={**auth, "If-None-Match": condition.format(etag=gateway.etag)})
    assert answer.status == status
    for header in ("ETag", "Cache-Control", "Vary"):  # a 304 carries what the 200 carries
        assert answer.headers[header] == plain.headers[header]
    assert plain.headers["ETag"] == gateway.etag and not gateway.etag.startswith("W/")
    assert plain.headers["Cache-Control"] == "private, max-age=3600" and plain.headers["Vary"] == "Authorization"
    body = await answer.read()
    assert body == b"" if method == "HEAD" or status == 304 else json.loads(body)["state"] == "READY"
    if method == "HEAD":
        assert int(plain.headers["Content-Length"]) > 0  # the GET's length, without the body


async def test_revalidation_of_an_immutable_version_skips_the_service(gateway):
    auth = {**gateway.auth("alpha", "developer"), "If-None-Match": gateway.etag}
    def counted(name: str, **labels: str) -> float:
        return REGISTRY.get_sample_value(name, labels) or 0.0

    requests = {"method": "GET", "route": "/v1/datasets/{name}/versions/{version}", "status": "304"}
    before = counted("llmp_http_revalidated_total"), counted("llmp_http_requests_total", **requests)
    for _ in range(5):
        assert (await gateway.client.get(gateway.dataset, headers=auth)).status == 304
    assert counted("llmp_http_revalidated_total") - before[0] == 5  # answered by the gateway itself
    assert counted("llmp_http_requests_total", **requests) - before[1] == 5  # and counted like any request
    latency = {"method": "GET", "route": requests["route"]}
    assert counted("llmp_http_request_seconds_count", **latency) >= 5
    assert counted("llmp_http_request_seconds_bucket", **latency, le="+Inf") == \
        counted("llmp_http_request_seconds_count", **latency)
    scraped = await (await gateway.client.get("/metrics")).text()
    assert f'llmp_http_request_seconds_count{{method="GET",route="{requests["route"]}"}}' in scraped
    # Another tenant presenting the same ETag learns nothing: 404, not 304.
    other = await gateway.client.get(gateway.dataset, headers={**gateway.auth("beta", "developer"),
                                                               "If-None-Match": gateway.etag})
    assert other.status == 404 and other.headers["Cache-Control"] == "no-store"


async def test_a_warm_304_path_still_checks_the_role_the_rate_limit_the_key_and_the_target(gateway):
    """Revalidations remember what depends on the target alone (its route, its query and path checks) and the
    verified key for `auth.CACHE_SECONDS`; none of that lets through a role that may not read, a key past its
    rate limit, a key revoked here, or a query the route does not take."""
    admin = {"Authorization": "Bearer llmp_bootstrap_gateway-contract-admin"}
    condition = {"If-None-Match": gateway.etag}
    for _ in range(3):  # every memo of the path warm
        assert (await gateway.client.get(gateway.dataset, headers={**gateway.auth("alpha", "developer"),
                                                                   **condition})).status == 304
    refused = await gateway.client.get(gateway.dataset, headers={**gateway.auth("alpha", "inference"), **condition})
    assert refused.status == 403 and (await refused.json())["error"]["type"] == "permission_denied"
    queried = await gateway.client.get(gateway.dataset + "?tenant=other",
                                       headers={**gateway.auth("alpha", "developer"), **condition})
    assert queried.status == 422, await queried.text()

    created = await gateway.client.post("/v1/api-keys", json={"tenant": gateway.tenants["alpha"],
                                                              "role": "developer", "rate_limit": 1}, headers=admin)
    key = await created.json()
    slow = {"Authorization": f"Bearer {key['key']}", **condition}
    statuses = [(await gateway.client.get(gateway.dataset, headers=slow)).status for _ in range(120)]
    assert statuses[0] == 304 and 429 in statuses and set(statuses) == {304, 429}, statuses
    revoked = await gateway.client.delete(f"/v1/api-keys/{key['id']}", headers=admin)
    assert revoked.status == 204
    await asyncio.sleep(1.1)  # a token back in its bucket: what answers now is the key check, not the limit
    gone = await gateway.client.get(gateway.dataset, headers=slow)
    assert gone.status == 401, await gone.text()


@pytest.mark.parametrize("condition, status", [
    ('W/{etag}', 412), ('"nope"', 412), ("*", 200), ("{etag}", 200),
])
async def test_if_match_on_delete(gateway, condition, status):
    auth = gateway.auth("alpha", "developer")
    await gateway.client.get(gateway.dataset, headers=auth)  # the fast path now knows the version
    deleted = await gateway.client.delete(gateway.dataset,
                                          headers={**auth, "If-Match": condition.format(etag=gateway.etag)})
    assert deleted.status == status, await deleted.text()
    again = await gateway.client.get(gateway.dataset, headers={**auth, "If-None-Match": gateway.etag})
    # A deletion forgets the validators at once: the next revalidation is a 404, not a stale 304.
    assert again.status == (304 if status == 412 else 404)


async def test_if_none_match_star_on_delete_of_an_existing_version_is_412(gateway):
    auth = gateway.auth("alpha", "developer")
    answer = await gateway.client.delete(gateway.dataset, headers={**auth, "If-None-Match": "*"})
    assert answer.status == 412 and (await answer.json())["error"]["type"] == "precondition_failed"


@pytest.mark.parametrize("headers, status", [
    ({}, 428), ({"If-Match": 'W/"abc"'}, 412),
])
async def test_put_alias_needs_a_strong_precondition(gateway, headers, status):
    answer = await gateway.client.put("/v1/models/m/aliases/prod", json={"version": 1},
                                      headers={**gateway.auth("alpha", "developer"), **headers})
    assert answer.status == status
    assert answer.headers["Cache-Control"] == "no-store"


# -- roles, tenants and fields a caller may not set, on every route ---------------------------------

async def test_every_route_checks_the_key_and_the_role(gateway):
    table = routes.all_routes()
    assert len(table) >= 25
    for route in table:
        path = concrete(route.path)
        if not route.roles:
            continue
        missing = await gateway.client.request(route.method, path)
        assert missing.status == 401, (route.method, route.path)
        assert missing.headers["Cache-Control"] == "no-store"
        for tenant in ("alpha", "beta"):
            for role in ROLES:
                answer = await gateway.client.request(route.method, path, headers=gateway.auth(tenant, role))
                allowed = role == "admin" or role in route.roles
                if allowed:
                    assert answer.status not in {401, 403}, (route.method, route.path, role, answer.status)
                else:
                    assert answer.status == 403, (route.method, route.path, role, answer.status)
                    assert (await answer.json())["error"]["type"] == "permission_denied"


async def test_another_tenants_dataset_is_404_on_every_dataset_route(gateway):
    for role in ("admin", "developer"):
        auth = gateway.auth("beta", role)
        for method, path in [("GET", gateway.dataset), ("HEAD", gateway.dataset),
                             ("GET", gateway.dataset + "/events"), ("DELETE", gateway.dataset),
                             ("GET", gateway.dataset.rsplit("/versions", 1)[0])]:
            answer = await gateway.client.request(method, path, headers=auth)
            if method == "GET" and path.endswith("contract"):  # the dataset's version list: empty, not alpha's
                assert answer.status in {200, 404}
                if answer.status == 200:
                    assert (await answer.json())["versions"] == []
            else:
                assert answer.status == 404, (method, path, role)
        listed = await (await gateway.client.get("/v1/datasets", headers=auth)).json()
        assert "contract" not in [d["name"] for d in listed["datasets"]]
    assert (await gateway.client.get(gateway.dataset, headers=gateway.auth("alpha", "developer"))).status == 200


@pytest.mark.parametrize("method, path, body", [
    ("POST", "/v1/training-jobs", {"dataset": {"name": "d", "version": 1}, "model": {"family": "gpt2"},
                                   "state": "SUCCEEDED"}),
    ("POST", "/v1/training-jobs", {"dataset": {"name": "d", "version": 1, "tenant": "beta"},
                                   "model": {"family": "gpt2"}}),
    ("POST", "/v1/training-jobs", {"dataset": {"name": "d", "version": 1}, "model": {"family": "gpt2"},
                                   "owner": "someone"}),
    ("PUT", "/v1/models/m/aliases/prod", {"version": 1, "sha256": "0" * 64}),
    ("PUT", "/v1/models/m/aliases/prod", {"version": 1, "tenant": "beta"}),
    ("POST", "/v1/models/m/versions/1/exports", {"format": "onnx", "state": "READY"}),
    ("PUT", "/v1/deployments/d", {"model": "m", "stable": 1, "state": "READY"}),
    ("POST", "/v1/completions", {"model": "d", "prompt": "hi", "tenant": "beta"}),
    ("POST", "/v1/api-keys", {"tenant": "beta", "role": "developer", "owner": "x"}),
])
async def test_fields_a_caller_may_not_set_are_422(gateway, method, path, body):
    headers = {**gateway.auth("alpha", "admin"), "If-None-Match": "*"}
    answer = await gateway.client.request(method, path, json=body, headers=headers)
    assert answer.status == 422, await answer.text()
    assert (await answer.json())["error"]["type"] == "validation_failed"


@pytest.mark.parametrize("query", ["tenant=beta", "state=READY", "owner=x", "sha256=abc"])
async def test_query_fields_a_caller_may_not_set_are_422(gateway, query):
    auth = gateway.auth("alpha", "developer")
    created = await gateway.client.post(f"/v1/datasets?name=q&{query}", data=b"text", headers=auth)
    assert created.status == 422 and query.split("=")[0] in (await created.json())["error"]["message"]
    got = await gateway.client.get(f"{gateway.dataset}?{query}", headers=auth)
    assert got.status == 422


# -- HEAD, Cache-Control, Vary, rate limits, SSE, tracing -------------------------------------------

async def test_every_get_route_answers_head_and_every_response_has_cache_control(gateway):
    auth = gateway.auth("alpha", "admin")
    for route in routes.all_routes():
        if route.method != "GET":
            continue
        path = gateway.dataset if route.path == "/v1/datasets/{name}/versions/{version}" else concrete(route.path)
        get = await gateway.client.get(path, headers=auth)
        head = await gateway.client.head(path, headers=auth)
        assert head.status == get.status, (route.path, head.status, get.status)
        assert await head.read() == b""
        for answer in (get, head):
            assert answer.headers.get("Cache-Control"), route.path
        if get.status == 200 and route.roles:
            assert get.headers["Vary"] == "Authorization" and get.headers["ETag"], route.path
    for method, path in [("GET", "/v1/nothing"), ("PATCH", "/v1/datasets")]:
        answer = await gateway.client.request(method, path)
        assert answer.status in {404, 405} and answer.headers["Cache-Control"] == "no-store"


async def test_rate_limit_is_429_with_retry_after_per_key(gateway):
    admin = {"Authorization": "Bearer llmp_bootstrap_gateway-contract-admin"}
    created = await gateway.client.post("/v1/api-keys", json={"tenant": gateway.tenants["alpha"],
                                                              "role": "developer", "rate_limit": 1}, headers=admin)
    slow = {"Authorization": f"Bearer {(await created.json())['key']}"}
    statuses = [(await gateway.client.get(gateway.dataset, headers=slow)).status for _ in range(120)]
    assert statuses[0] == 200 and 429 in statuses
    limited = await gateway.client.get(gateway.dataset, headers=slow)
    assert limited.status == 429 and int(limited.headers["Retry-After"]) >= 1
    assert (await limited.json())["error"]["type"] == "rate_limited"
    # Another key is not affected.
    assert (await gateway.client.get(gateway.dataset, headers=gateway.auth("alpha", "developer"))).status == 200


async def test_server_sent_events_framing(gateway):
    answer = await gateway.client.get(gateway.dataset + "/events", headers=gateway.auth("alpha", "developer"))
    assert answer.status == 200
    assert answer.headers["Content-Type"].startswith("text/event-stream")
    assert answer.headers["Cache-Control"] == "no-store"
    text = await answer.text()
    assert text.endswith("\n\n")
    frames = text.split("\n\n")[:-1]
    assert frames[-1] == "data: [DONE]" and len(frames) >= 2
    ids = []
    for frame in frames[:-1]:
        fields = dict(line.split(": ", 1) for line in frame.split("\n"))
        assert set(fields) == {"id", "event", "data"}
        ids.append(int(fields["id"]))
        json.loads(fields["data"])
    assert ids == sorted(ids) and len(set(ids)) == len(ids)


async def test_spans_carry_the_request_id(gateway):
    gateway.client.spans.clear()
    answer = await gateway.client.get(gateway.dataset, headers={**gateway.auth("alpha", "developer"),
                                                                "X-Request-Id": "trace-me-1"})
    assert answer.headers["X-Request-Id"] == "trace-me-1"
    await asyncio.sleep(0)
    spans = gateway.client.spans.get_finished_spans()
    server = [span for span in spans if span.attributes.get("llmp.request_id") == "trace-me-1"]
    assert server and server[0].kind.name == "SERVER"
    # The gRPC call to the dataset service is a child span of the same trace.
    children = [span for span in spans if span.kind.name == "CLIENT"
                and span.context.trace_id == server[0].context.trace_id]
    assert children, [span.name for span in spans]


async def test_a_request_no_route_matches_is_an_unmatched_span(gateway):
    gateway.client.spans.clear()
    answer = await gateway.client.get("/v1/no-such-thing", headers=gateway.auth("alpha", "developer"))
    assert answer.status == 404
    await asyncio.sleep(0)
    server = [span for span in gateway.client.spans.get_finished_spans() if span.kind.name == "SERVER"]
    assert [(span.name, span.attributes["http.route"]) for span in server] == [("GET unmatched", "unmatched")]

async def test_an_upload_over_the_limit_is_413_naming_the_limit(gateway, aiohttp_client, settings_env):
    """A chunked body (no Content-Length to refuse it by) goes to the dataset service chunk by chunk on a
    client-streaming call; reading past the limit ends that call (grpc.aio cancels it), and the answer names
    the limit, not the cancelled call."""
    from gateway.app import init_app
    from services.common.config import Settings

    settings = Settings.from_env({**settings_env, "LLMP_MAX_UPLOAD_BYTES": "1000",
                                  "LLMP_ADMIN_KEY": "llmp_bootstrap_gateway-contract-admin"})
    small = await aiohttp_client(init_app(settings))

    async def chunked():
        for _ in range(5):
            yield b"x" * 1000

    answer = await small.post("/v1/datasets?name=oversized&tokenizer=char", data=chunked(),
                              headers=gateway.auth("alpha", "developer"))
    assert answer.status == 413, await answer.text()
    assert (await answer.json())["error"] == {"type": "payload_too_large",
                                              "message": "upload exceeds the limit of 1000 bytes"}
