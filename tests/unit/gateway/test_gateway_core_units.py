"""The gateway's pieces without servers: the validator cache, the token bucket, the OpenAPI document."""

import pytest
from openapi_spec_validator import validate

from gateway import app as gateway_app
from gateway import openapi, routes
from gateway.auth import RateLimiter
from gateway.http import ValidatorCache
from services.common import errors

HEADERS = {"ETag": '"a"', "Cache-Control": "private, max-age=3600", "Vary": "Authorization"}


def test_validator_cache_is_per_tenant_and_forgets_a_path_and_what_is_below_it():
    cache = ValidatorCache()
    cache.remember("alpha", "/v1/datasets/d/versions/1", HEADERS, 60)
    cache.remember("alpha", "/v1/datasets/d/versions/1?x=1", HEADERS, 60)
    cache.remember("alpha", "/v1/datasets/dd/versions/1", HEADERS, 60)
    cache.remember("beta", "/v1/datasets/d/versions/1", HEADERS, 60)
    assert cache.lookup("alpha", "/v1/datasets/d/versions/1") == HEADERS
    assert cache.lookup("gamma", "/v1/datasets/d/versions/1") is None
    cache.forget("alpha", "/v1/datasets/d")
    assert cache.lookup("alpha", "/v1/datasets/d/versions/1") is None
    assert cache.lookup("alpha", "/v1/datasets/d/versions/1?x=1") is None
    assert cache.lookup("alpha", "/v1/datasets/dd/versions/1") == HEADERS  # a sibling, not below
    assert cache.lookup("beta", "/v1/datasets/d/versions/1") == HEADERS  # another tenant's entry stays


def test_validator_cache_entries_expire_and_the_cache_is_bounded():
    cache = ValidatorCache(capacity=2)
    cache.remember("t", "/gone", HEADERS, -1)
    assert cache.lookup("t", "/gone") is None
    for path in ("/a", "/b", "/c"):
        cache.remember("t", path, HEADERS, 60)
    assert len(cache) == 2 and cache.lookup("t", "/a") is None and cache.lookup("t", "/c") == HEADERS


def test_token_bucket_allows_the_burst_then_429_with_retry_after():
    limiter = RateLimiter(rate=1, burst=3)
    for _ in range(3):
        limiter.take("k")
    with pytest.raises(errors.RateLimited) as raised:
        limiter.take("k")
    assert 0 < raised.value.retry_after <= 1
    limiter.take("other")  # buckets are per key


def test_openapi_document_is_valid_and_documents_every_route_and_request_schema():
    table = routes.all_routes()
    document = openapi.document(table)
    validate(document)  # raises on an invalid OpenAPI 3.1 document
    for route in table:
        if route.tag == "console":  # the browser console's HTML and files are not part of the JSON API
            continue
        operation = document["paths"][route.path][route.method.lower()]
        if route.body is not None:
            assert operation["requestBody"]["content"]["application/json"]["schema"] == route.body
        assert {p["name"] for p in operation["parameters"] if p["in"] == "query"} == set(route.query)
        assert ("security" in operation) and (operation["security"] == ([{"apiKey": []}] if route.roles else []))


def test_every_get_route_also_serves_head():
    table = routes.all_routes()
    served = {(route.method, route.path) for route in gateway_app._with_head(table)}
    assert all(("HEAD", route.path) in served for route in table if route.method == "GET")


def test_openapi_documents_head_for_every_get_route_with_no_body():
    table = routes.all_routes()
    paths = openapi.document(table)["paths"]
    served = gateway_app._with_head(table)
    documented = {("HEAD", path) for path, operations in paths.items() if "head" in operations}
    assert documented == {(r.method, r.path) for r in served if r.method == "HEAD" and r.tag != "console"}
    for path, operations in paths.items():
        if "get" not in operations:
            continue
        get, head = operations["get"], operations["head"]
        assert head["parameters"] == get["parameters"] and head["security"] == get["security"]
        assert head["operationId"] != get["operationId"] and set(head["responses"]) == set(get["responses"])
        assert all("content" not in answer for answer in head["responses"].values()), path
        if "application/json" in get["responses"]["200"]["content"]:  # answered by json_response: validators, 304
            assert "ETag" in head["responses"]["200"]["headers"] and "ETag" in head["responses"]["304"]["headers"]
        else:  # a stream or the metrics text: no ETag, so never a 304
            assert "304" not in get["responses"] and "headers" not in get["responses"]["200"], path
    operation_ids = [op["operationId"] for operations in paths.values() for op in operations.values()]
    assert len(operation_ids) == len(set(operation_ids))


def test_request_ids_are_unique_without_a_system_call_each():
    ids = {next(gateway_app._request_ids) for _ in range(1000)}
    assert len(ids) == 1000 and len({i[:16] for i in ids}) == 1


async def test_tenant_quota_holds_per_replica_while_redis_is_unreachable(caplog):
    """With the quota store down, requests (concurrent ones sharing the failed refill) are still counted
    against the tenant's rate, locally: the burst passes, the next is 429 naming the quota."""
    import asyncio

    from gateway.quotas import TenantQuotas
    from services.common.config import Settings

    settings = Settings.from_env({"LLMP_QUOTA_REDIS_URL": "redis://127.0.0.1:1/0", "LLMP_TENANT_RATE_LIMIT": "5"})
    quotas = TenantQuotas(settings)  # nothing listens on port 1
    try:
        await asyncio.gather(*(quotas.take("t") for _ in range(10)))  # the burst: two seconds' worth
        with pytest.raises(errors.RateLimited, match="tenant request quota of 5 requests/s"):
            await quotas.take("t")
        assert "quota store unreachable" in caplog.text
    finally:
        await quotas.close()


def _version_request(target: str):
    """A GET of a dataset version's target, matched as the router matches it."""
    from aiohttp.test_utils import make_mocked_request
    from aiohttp.web_urldispatcher import UrlMappingMatchInfo

    request = make_mocked_request("GET", target)
    name = target.split("?")[0].split("/")[3]
    request._match_info = UrlMappingMatchInfo({"name": name, "version": "1"}, None)
    return request


def _version_plan():
    route = next(route for route in routes.all_routes()
                 if route.method == "GET" and route.path == "/v1/datasets/{name}/versions/{version}")
    return gateway_app._Plan(route.method, route.path, route)


def test_a_target_that_passed_its_checks_is_not_checked_again_and_one_that_failed_always_is(monkeypatch):
    plan = _version_plan()
    plan.check_target(_version_request("/v1/datasets/wiki/versions/1"))
    assert set(plan.checked) == {"/v1/datasets/wiki/versions/1"}

    def no_check(*args):
        raise AssertionError("a remembered target was checked again")

    monkeypatch.setattr(gateway_app, "validate_path", no_check)
    monkeypatch.setattr(gateway_app, "validate_query", no_check)
    plan.check_target(_version_request("/v1/datasets/wiki/versions/1"))
    monkeypatch.undo()
    for bad in ("/v1/datasets/Bad%20Name/versions/1", "/v1/datasets/wiki/versions/1?tenant=other"):
        for _ in range(2):  # refused each time: a refusal is not remembered
            with pytest.raises(errors.ValidationFailed):
                plan.check_target(_version_request(bad))
    assert set(plan.checked) == {"/v1/datasets/wiki/versions/1"}


def test_the_checked_targets_are_bounded(monkeypatch):
    monkeypatch.setattr(gateway_app, "CHECKED_TARGETS", 10)
    plan = _version_plan()
    for at in range(35):
        plan.check_target(_version_request(f"/v1/datasets/d{at}/versions/1"))
        assert len(plan.checked) <= 10
    assert "/v1/datasets/d34/versions/1" in plan.checked
    plan.checked.clear()
    monkeypatch.setattr(gateway_app, "REMEMBERED_TARGET_CHARS", len("/v1/datasets/d/versions/1"))
    plan.check_target(_version_request("/v1/datasets/d/versions/1"))
    plan.check_target(_version_request("/v1/datasets/dd/versions/1"))  # checked, not remembered: too long
    assert set(plan.checked) == {"/v1/datasets/d/versions/1"}
