"""The whole stack, as `make up` starts it, driven through the gateway."""

from __future__ import annotations

import asyncio
import json

import pytest

from cli.client import ApiError
from services.common import topology
from services.common.grpc_client import health_check

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_up_is_healthy_quickly_and_every_service_serves(stack):
    assert stack.up_seconds < 60, f"llmp up took {stack.up_seconds:.1f}s"
    status = stack.llmp("status", "--json")
    assert status.returncode == 0, status.stderr
    components = json.loads(status.stdout)
    rows = components["components"] if isinstance(components, dict) else components
    assert {"postgres", "s3", "broker", "triton", "dataset", "training", "registry", "inference", "worker",
            "gateway"} <= {row["name"] for row in rows}
    for service in topology.GRPC_SERVICES:
        assert asyncio.run(health_check(stack.env[service.addr_env])) == "SERVING", service.name
    client = stack.client()
    assert client.call("GET", "/healthz") == {"status": "ok"}
    assert client.call("GET", "/readyz")["status"] == "ready"
    backends = client.call("GET", "/v1/status")
    assert backends["status"] == "ok" and not backends["failing"], backends


@pytest.mark.parametrize("path, field", [
    ("/v1/datasets", "datasets"),
    ("/v1/training-jobs", "jobs"),
    ("/v1/models", "models"),
    ("/v1/deployments", "deployments"),
])
def test_a_real_call_reaches_every_service(stack, path, field):
    listing = stack.client().call("GET", path)
    assert isinstance(listing[field], list)
    with pytest.raises(ApiError) as unauthenticated:
        stack.client(key="").call("GET", path)
    assert unauthenticated.value.status == 401


def test_the_main_job_end_to_end(stack):
    """Corpus → dataset → Celery/torchrun training → registry → ONNX → Triton → completion."""
    from cli import demo

    corpus = demo.stdlib_docstrings(limit_bytes=200_000)
    text = demo.run(stack.client(), corpus, max_steps=30, prompt="Return the ")
    assert isinstance(text, str) and text
    models = stack.client().call("GET", "/v1/models")["models"]
    assert any(model["name"] == demo.DEMO_NAME for model in models)
    # Changing the live deployment without its ETag is refused (428), with a stale one too (412).
    change = {"model": demo.DEMO_NAME, "stable": 1}
    with pytest.raises(ApiError) as missing:
        stack.client().call("PUT", f"/v1/deployments/{demo.DEMO_NAME}", change)
    assert missing.value.status == 428
    with pytest.raises(ApiError) as stale:
        stack.client().call("PUT", f"/v1/deployments/{demo.DEMO_NAME}", change, headers={"If-Match": '"stale"'})
    assert stale.value.status == 412
    # A deployed version cannot be deleted from the registry.
    with pytest.raises(ApiError) as in_use:
        stack.client().call("DELETE", f"/v1/models/{demo.DEMO_NAME}/versions/1")
    assert in_use.value.status == 409
