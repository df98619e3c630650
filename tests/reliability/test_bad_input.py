"""Issue 9, item 7: bad input gets the right 4xx (or gRPC status), never a 5xx, and the stack keeps serving.

Malformed JSON, wrong types, huge bodies and headers, invalid UTF-8, path traversal and SQL
metacharacters in names, NUL bytes, out-of-range numbers, oversize gRPC messages, slow bodies; then a
property-based fuzzer (hypothesis) over every operation of `/openapi.json`.
"""

from __future__ import annotations

import json
import socket
import time

import grpc
import jsonschema
import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway import openapi
from tests import identities

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

JOB = {"dataset": {"name": "nope", "version": 1},
       "model": {"family": "gpt2", "n_layer": 1, "n_head": 1, "n_embd": 8, "block_size": 8},
       "hyperparameters": {"max_steps": 1}, "distributed": {"mode": "ddp", "nproc_per_node": 1}}


def assert_error(response: requests.Response, *statuses: int) -> dict:
    assert response.status_code in statuses, (response.status_code, response.text[:300])
    body = response.json()
    jsonschema.validate(body, openapi.ERROR_SCHEMA)
    return body["error"]


@pytest.mark.parametrize("body, status", [
    (b"{bad", 400),
    (b'{"dataset": ', 400),
    (b"[]", 400),
    (b'"a string"', 400),
    (b"null", 400),
    (b"", 400),
    (b'{"a": "\xff\xfe"}', 400),  # invalid UTF-8
    (b"\xef\xbb\xbf{}", 400),  # a BOM is not JSON (RFC 8259 §8.1)
    (b'{"a": NaN}', 422),  # Python's json accepts NaN; the schema then refuses the unknown body
    (json.dumps({**JOB, "model": "gpt2"}).encode(), 422),  # wrong types
    (json.dumps({**JOB, "hyperparameters": {"max_steps": "ten"}}).encode(), 422),
    (json.dumps({**JOB, "hyperparameters": {"max_steps": 10**30}}).encode(), 422),
    (json.dumps({**JOB, "distributed": {"mode": "ddp", "nproc_per_node": -1}}).encode(), 422),
    (json.dumps({**JOB, "unknown": 1}).encode(), 422),
])
def test_malformed_and_mistyped_json_is_4xx(stack, body, status):
    response = stack.http("POST", "/v1/training-jobs", data=body, headers={"Content-Type": "application/json"})
    assert_error(response, status, 400, 422)


def test_huge_bodies_are_413_and_huge_headers_are_4xx(stack):
    big = json.dumps({**JOB, "padding": "x" * (2 * 1024 * 1024)}).encode()
    for path in ("/v1/training-jobs", "/v1/completions", "/v1/api-keys"):
        assert_error(stack.http("POST", path, data=big, headers={"Content-Type": "application/json"}), 413)
    huge_header = stack.http("GET", "/v1/datasets", headers={"X-Padding": "y" * 70_000})
    assert 400 <= huge_header.status_code < 500
    assert stack.http("GET", "/healthz").status_code == 200


def test_invalid_utf8_in_a_corpus_is_400(stack):
    response = stack.http("POST", "/v1/datasets", params={"name": "bad-utf8", "tokenizer": "char"},
                          data=b"good line\nbad \xff byte\n", headers={"Content-Type": "text/plain"})
    assert_error(response, 400, 422)


TRAVERSAL = ["..", "../../etc/passwd", "%2e%2e%2f%2e%2e", "a/../../b", "..%2f..%2fetc", "%00", "a%00b", "~root",
             "CON", "a" * 300, "%ff%fe", "名前"]
SQL = ["'; DROP TABLE api_keys; --", "' OR '1'='1", "x\" OR 1=1 --", "1; SELECT pg_sleep(10)", "%27%3B--"]


@pytest.mark.parametrize("name", TRAVERSAL + SQL)
@pytest.mark.parametrize("template", [
    "/v1/datasets/{}", "/v1/datasets/{}/versions/1", "/v1/models/{}", "/v1/models/{}/versions/1",
    "/v1/models/m/aliases/{}", "/v1/deployments/{}", "/v1/training-jobs/{}", "/v1/training-jobs/{}/metrics",
])
def test_hostile_names_in_paths_are_4xx(stack, template, name):
    started = time.monotonic()
    response = stack.http("GET", template.format(name))
    assert 400 <= response.status_code < 500, (response.status_code, response.text[:300])
    assert time.monotonic() - started < 5  # pg_sleep never ran


@pytest.mark.parametrize("path", [
    "/v1/models/x/versions/99999999999999999999999",
    "/v1/datasets/x/versions/0",
    "/v1/datasets/x/versions/99999999999999999999999",
    "/v1/models/x/versions/-1", "/v1/models/x/versions/1e3"])
def test_out_of_range_versions_are_4xx(stack, path):
    assert_error(stack.http("GET", path), 400, 404, 422)


@pytest.mark.parametrize("params", [
    {"page_size": "abc"}, {"page_size": "-1"}, {"page_size": str(10**20)}, {"page_token": "'; DROP TABLE x; --"},
    {"page_token": "\x00"}, {"state": "'; --"}, {"state": "RUNNING' OR 1=1"},
])
@pytest.mark.parametrize("path", ["/v1/datasets", "/v1/training-jobs", "/v1/models"])
def test_hostile_query_parameters_are_4xx_or_ignored(stack, path, params):
    response = stack.http("GET", path, params=params)
    assert response.status_code < 500, (response.status_code, response.text[:300])
    if response.status_code >= 400:
        assert_error(response, response.status_code)


@pytest.mark.parametrize("query", [
    {"name": "../../x", "tokenizer": "char"}, {"name": "x'; DROP TABLE datasets; --", "tokenizer": "char"},
    {"name": "ok", "tokenizer": "bogus"}, {"name": "ok", "vocab_size": "-5"},
    {"name": "ok", "source": "file:///etc/passwd"},
    {"name": "ok", "source": "s3://other-bucket/../../x"},
    {"name": "ok", "source": "s3://llmp/../../etc/passwd"}, {"name": "ok\x00"},
])
def test_hostile_dataset_uploads_are_4xx(stack, query):
    response = stack.http("POST", "/v1/datasets", params=query, data=b"hello world\n")
    assert_error(response, 400, 404, 422)


def test_sql_metacharacters_leave_the_tables_intact(stack):
    for name in SQL:
        stack.http("POST", "/v1/api-keys", json={"tenant": "acme", "role": "inference", "name": name})
    listing = stack.http("GET", "/v1/api-keys")
    assert listing.status_code == 200
    names = {key["name"] for key in listing.json()["api_keys"]}
    assert set(SQL) <= names  # stored verbatim: parameters, never string-built SQL


def _raw(stack, request: bytes, then: bytes = b"", pause: float = 0.0) -> bytes:
    port = int(stack.env["LLMP_GATEWAY_PORT"])
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(request)
        for byte in then:
            time.sleep(pause)
            sock.sendall(bytes([byte]))
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_a_slow_body_is_served_and_does_not_block_others(stack):
    body = b'{"tenant": "acme", "role": "bogus"}'
    head = (f"POST /v1/api-keys HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {stack.admin_key}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    import threading

    answer: list[bytes] = []
    trickle = threading.Thread(target=lambda: answer.append(_raw(stack, head, body, pause=0.05)))
    trickle.start()
    started = time.monotonic()
    assert stack.http("GET", "/healthz").status_code == 200  # not blocked behind the slow body
    assert time.monotonic() - started < 1
    trickle.join(30)
    assert answer and answer[0].startswith(b"HTTP/1.1 422"), answer[:1]


def test_a_truncated_body_never_becomes_a_5xx(stack):
    head = (f"POST /v1/training-jobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {stack.admin_key}\r\n"
            f"Content-Type: application/json\r\nContent-Length: 1000\r\nConnection: close\r\n\r\n").encode()
    answer = _raw(stack, head + b'{"dataset": ')
    assert not answer.startswith(b"HTTP/1.1 5"), answer[:200]
    metrics = stack.http("GET", "/metrics").text
    fives = [line for line in metrics.splitlines()
             if line.startswith("llmp_http_requests_total") and 'status="5' in line
             and 'method="POST",route="/v1/training-jobs"' in line]  # other tests' GETs may 503 (faults)
    assert not fives, fives
    assert stack.http("GET", "/healthz").status_code == 200


def test_an_oversize_grpc_message_is_resource_exhausted(stack):
    from llmp.dataset.v1 import dataset_pb2, dataset_pb2_grpc

    options = [("grpc.max_send_message_length", 128 * 1024 * 1024)]
    with grpc.insecure_channel(stack.env["LLMP_DATASET_ADDR"], options=options) as channel:
        stub = dataset_pb2_grpc.DatasetServiceStub(channel)
        with pytest.raises(grpc.RpcError) as raised:
            stub.GetDatasetVersion(dataset_pb2.GetDatasetVersionRequest(name="x" * (65 * 1024 * 1024), version=1),
                                   metadata=identities.metadata("acme", "dataset"), timeout=60)
        assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        with pytest.raises(grpc.RpcError) as small:  # and the server still answers
            stub.GetDatasetVersion(dataset_pb2.GetDatasetVersionRequest(name="x\x00'", version=1),
                                   metadata=identities.metadata("acme", "dataset"), timeout=10)
        assert small.value.code() in {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND}


# -- the fuzzer --------------------------------------------------------------------------------------

SKIP = {("post", "/v1/datasets")}  # a raw-body upload, covered above; its ingest costs CPU per example
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70) | st.floats(allow_nan=False)
    | st.text(max_size=40),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12)
HOSTILE_TEXT = st.sampled_from(TRAVERSAL + SQL + ["1", "0", "-1", "x", "a.b", "9" * 25]) | st.text(min_size=1,
                                                                                                  max_size=30)


def from_schema(schema: dict) -> st.SearchStrategy:
    """Values shaped like `schema` with a fair share of wrong ones."""
    if "enum" in schema:
        return st.sampled_from(schema["enum"]) | JSON_VALUES
    kind = schema.get("type")
    if kind == "object" or "properties" in schema:
        properties = schema.get("properties", {})
        required = {name: from_schema(sub) for name, sub in properties.items() if name in schema.get("required", [])}
        optional = {name: from_schema(sub) for name, sub in properties.items() if name not in required}
        return st.fixed_dictionaries(required, optional=optional) | JSON_VALUES
    if kind == "integer":
        return st.integers(min_value=-(2**65), max_value=2**65) | JSON_VALUES
    if kind == "number":
        return st.floats(allow_nan=False) | st.integers()
    if kind == "string":
        return HOSTILE_TEXT
    if kind == "boolean":
        return st.booleans() | JSON_VALUES
    if kind == "array":
        return st.lists(from_schema(schema.get("items", {})), max_size=3) | JSON_VALUES
    return JSON_VALUES


@pytest.fixture(scope="module")
def operations(stack):
    document = stack.http("GET", "/openapi.json").json()
    found = [(method, path, operation) for path, item in document["paths"].items()
             for method, operation in item.items() if (method, path) not in SKIP]
    assert len(found) > 25
    return document, found


@st.composite
def requests_for(draw, operations):
    method, path, operation = draw(st.sampled_from(operations))
    url = path
    query = {}
    for parameter in operation.get("parameters", []):
        if parameter["in"] == "path":
            url = url.replace("{" + parameter["name"] + "}", requests.utils.quote(draw(HOSTILE_TEXT), safe=""))
        elif draw(st.booleans()):
            value = draw(from_schema(parameter.get("schema", {})))
            query[parameter["name"]] = value if isinstance(value, str) else json.dumps(value)
    body = None
    if "requestBody" in operation:
        schema = operation["requestBody"]["content"]["application/json"]["schema"]
        body = json.dumps(draw(from_schema(schema))).encode()
    return method, path, url, query, body, operation


def test_the_openapi_fuzzer_finds_no_5xx_and_no_undocumented_shape(stack, operations, scale):
    document, found = operations
    seen: list[tuple[str, str, int]] = []

    @settings(max_examples=int(150 * scale), deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(requests_for(found))
    def one(drawn):
        method, path, url, query, body, operation = drawn
        response = stack.http(method.upper(), url, params=query, data=body,
                              headers={"Content-Type": "application/json"}, timeout=30)
        seen.append((method, path, response.status_code))
        assert response.status_code < 500, (method, url, query, body, response.status_code, response.text[:300])
        if method == "head":
            assert response.content == b"", (url, response.status_code)  # the GET's headers, never a body
        elif response.status_code >= 400 and response.status_code != 405:
            jsonschema.validate(response.json(), openapi.ERROR_SCHEMA)
        elif response.status_code == 200 and response.headers.get("Content-Type", "").startswith("application/json"):
            assert isinstance(response.json(), dict)

    one()
    assert len({(m, p) for m, p, _ in seen}) > 15  # it reached most operations
    assert stack.http("GET", "/readyz").status_code == 200  # and nothing it sent broke a backend


def test_every_status_the_api_answers_is_documented(stack, operations):
    document, found = operations
    missing = []
    for method, path, operation in found:
        statuses = set(operation["responses"])
        if "{" in path and "404" not in statuses:
            missing.append(f"{method} {path}: 404")
        if "requestBody" in operation and "413" not in statuses:
            missing.append(f"{method} {path}: 413")
    assert not missing, missing
