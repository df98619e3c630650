"""Issue 9, items 4 and 5: a backend stopped while the stack serves.

`/v1/status` turns 503 naming what failed while `/readyz` stays 200 (the gateway itself can serve),
requests get 503 with `Retry-After` (never a 500), nothing hangs past its deadline, and once the
backend is back (`llmp up` restarts only what is not healthy)
the stack recovers by itself: no llmp service is restarted.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import requests

from cli import servers

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

DEADLINE = 35.0  # the gateway's gRPC deadline (30 s) plus slack: no request may take longer


def until(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        time.sleep(0.3)


def backends(stack) -> requests.Response:
    return stack.http("GET", "/v1/status", timeout=10)


def backends_turn(stack, status: int, timeout: float) -> requests.Response:
    """The first /v1/status answer with `status` (a Response is falsy when not ok, hence the list)."""
    return until(lambda: [r] if (r := backends(stack)).status_code == status else None, timeout,
                 f"/v1/status {status}")[0]


def assert_still_ready(stack) -> None:
    # Readiness is the gateway process's own: a backend down must not take the replica out of service.
    assert stack.http("GET", "/readyz", key="", timeout=10).status_code == 200


def timed(stack, method: str, path: str, **kwargs) -> tuple[requests.Response, float]:
    started = time.monotonic()
    response = stack.http(method, path, timeout=DEADLINE + 5, **kwargs)
    return response, time.monotonic() - started


def service_pids(stack) -> dict[str, int]:
    return {name: stack.record(name)["pid"] for name in ("dataset", "training", "registry", "inference", "gateway")}


def assert_unavailable_not_broken(response: requests.Response, elapsed: float) -> None:
    assert elapsed < DEADLINE, f"answered after {elapsed:.1f}s"
    assert response.status_code != 500, response.text[:300]
    if response.status_code == 503:
        assert int(response.headers["Retry-After"]) >= 1
        assert response.json()["error"]["type"] == "unavailable"


def test_s3_stopped_then_back(stack):
    before = service_pids(stack)
    s3 = stack.record("s3")
    assert s3["mode"] == "process", "the suite's stack must own its S3 server"
    os.killpg(s3["pid"], signal.SIGKILL)
    until(lambda: not servers.port_open("127.0.0.1", s3["ports"][0]), 10, "S3 port closed")
    try:
        down = backends_turn(stack, 503, 20)
        assert_still_ready(stack)
        assert int(down.headers["Retry-After"]) >= 1
        body = down.json()
        assert body["failing"], body
        upload, elapsed = timed(stack, "POST", "/v1/datasets", params={"name": "rel-s3-down", "tokenizer": "char"},
                                data=b"some text while S3 is away\n" * 50)
        assert_unavailable_not_broken(upload, elapsed)
        assert upload.status_code == 503, upload.text[:300]  # refused now, not accepted and failed later
        listing, elapsed = timed(stack, "GET", "/v1/datasets")
        assert_unavailable_not_broken(listing, elapsed)
    finally:
        stack.restore()
    until(lambda: backends(stack).status_code == 200, 30, "/v1/status 200 after S3 returned")
    assert service_pids(stack) == before  # recovered by itself: no service restarted
    created = stack.http("POST", "/v1/datasets", params={"name": "rel-s3-back", "tokenizer": "char"},
                         data=b"text after S3 came back\n" * 50)
    assert created.status_code in {200, 201, 202}, created.text[:300]


def test_status_names_s3_when_s3_is_down(stack):
    s3 = stack.record("s3")
    os.killpg(s3["pid"], signal.SIGKILL)
    try:
        down = backends_turn(stack, 503, 20)
        assert_still_ready(stack)
        assert any("s3" in name for name in down.json()["failing"]), down.json()
    finally:
        stack.restore()


def test_an_upload_while_s3_is_down_is_refused_with_503(stack):
    s3 = stack.record("s3")
    os.killpg(s3["pid"], signal.SIGKILL)
    try:
        backends_turn(stack, 503, 20)
        upload, elapsed = timed(stack, "POST", "/v1/datasets", params={"name": "rel-s3-refused", "tokenizer": "char"},
                                data=b"some text while S3 is away\n" * 50)
        assert upload.status_code == 503, upload.text[:300]
    finally:
        stack.restore()


def test_postgresql_stopped_then_back(stack):
    before = service_pids(stack)
    postgres = stack.record("postgres")
    assert postgres["mode"] == "embedded", "the suite's stack must own its PostgreSQL"
    developer = stack.keys[("acme", "developer")]
    assert stack.http("GET", "/v1/datasets", key=developer).status_code == 200
    servers.stop_postgres(Path(postgres["detail"]), timeout=20)
    try:
        down = backends_turn(stack, 503, 20)
        assert_still_ready(stack)
        assert "postgresql" in down.json()["failing"], down.json()
        assert int(down.headers["Retry-After"]) >= 1
        for path in ("/v1/datasets", "/v1/training-jobs", "/v1/models", "/v1/deployments"):
            response, elapsed = timed(stack, "GET", path)  # the bootstrap admin: no key lookup needed
            assert_unavailable_not_broken(response, elapsed)
            assert response.status_code == 503, (path, response.status_code, response.text[:300])
    finally:
        stack.restore()
    until(lambda: backends(stack).status_code == 200, 30, "/v1/status 200 after PostgreSQL returned")
    assert service_pids(stack) == before
    until(lambda: stack.http("GET", "/v1/datasets", key=developer).status_code == 200, 15, "keys work again")
    for path in ("/v1/datasets", "/v1/training-jobs", "/v1/models", "/v1/deployments"):
        assert stack.http("GET", path).status_code == 200, path


def test_a_database_key_gets_503_while_postgresql_is_down(stack):
    postgres = stack.record("postgres")
    servers.stop_postgres(Path(postgres["detail"]), timeout=20)
    try:
        time.sleep(5.5)  # past the key cache
        response, elapsed = timed(stack, "GET", "/v1/datasets", key=stack.keys[("globex", "developer")])
        assert_unavailable_not_broken(response, elapsed)
        assert response.status_code == 503
    finally:
        stack.restore()


def test_triton_killed_inference_answers_503_fast_and_recovers(stack):
    before = service_pids(stack)
    triton = stack.record("triton")
    os.killpg(triton["pid"], signal.SIGKILL)
    try:
        down = backends_turn(stack, 503, 20)
        assert_still_ready(stack)
        assert "inference" in down.json()["failing"], down.json()
        for _ in range(5):
            response, elapsed = timed(stack, "POST", "/v1/completions", json={"model": "rel-none", "prompt": "hi"})
            assert elapsed < 1.0, f"completion answered after {elapsed:.2f}s"
            assert response.status_code in {404, 503}, response.text[:300]
        assert stack.http("GET", "/healthz").status_code == 200  # the gateway never crashed
    finally:
        stack.restore()
    until(lambda: backends(stack).status_code == 200, 60, "/v1/status 200 after Triton returned")
    assert service_pids(stack) == before
