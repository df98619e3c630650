"""Issue 15, hygiene: every response carries `X-Content-Type-Options: nosniff` — JSON, errors, 304s from
the gateway's own fast path, HEAD, public routes, the console, and event streams."""

import pytest

pytestmark = pytest.mark.integration


async def test_every_kind_of_response_says_nosniff(gateway):
    developer = gateway.auth("alpha", "developer")
    answers = {
        "200": await gateway.client.get(gateway.dataset, headers=developer),
        "304": await gateway.client.get(gateway.dataset, headers={**developer, "If-None-Match": gateway.etag}),
        "HEAD": await gateway.client.head(gateway.dataset, headers=developer),
        "401": await gateway.client.get("/v1/datasets"),
        "403": await gateway.client.get("/v1/datasets", headers=gateway.auth("alpha", "inference")),
        "404 other tenant": await gateway.client.get(gateway.dataset, headers=gateway.auth("beta", "developer")),
        "404 no route": await gateway.client.get("/nowhere", headers=developer),
        "405": await gateway.client.patch("/v1/datasets", headers=developer),
        "400": await gateway.client.post("/v1/api-keys", data=b"{bad", headers=gateway.auth("alpha", "admin")),
        "422": await gateway.client.post("/v1/completions", json={"model": "m", "prompt": "p", "top_k": -1},
                                         headers=developer),
        "503": await gateway.client.get("/v1/training-jobs", headers=developer),
        "openapi": await gateway.client.get("/openapi.json"),
        "healthz": await gateway.client.get("/healthz"),
        "metrics": await gateway.client.get("/metrics"),
        "console": await gateway.client.get("/"),
        "events": await gateway.client.get(gateway.dataset + "/events", headers=developer),
    }
    statuses = {name: response.status for name, response in answers.items()}
    assert statuses["304"] == 304 and statuses["events"] == 200 and statuses["console"] == 200, statuses
    missing = {name: response.status for name, response in answers.items()
               if response.headers.get("X-Content-Type-Options") != "nosniff"}
    assert not missing, missing
    assert (await answers["events"].text()).endswith("data: [DONE]\n\n")
