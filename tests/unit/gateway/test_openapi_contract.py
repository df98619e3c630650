"""Issue 15, item 8: /openapi.json declares what the server enforces and answers, derived from the route table
and the contracts (never numbers copied by hand), and a route added tomorrow gets the same treatment."""

from __future__ import annotations

import pytest
from multidict import MultiDict
from prometheus_client import CONTENT_TYPE_LATEST

from gateway import openapi, routes
from gateway.http import INT64_MAX, Link, Route, validate_query
from services.common import contracts, errors


async def handler(request):  # never called: the documents below are only built
    raise AssertionError


@pytest.fixture(scope="module")
def document() -> dict:
    return openapi.document(routes.all_routes())


def _operations(document: dict):
    for path, item in document["paths"].items():
        for method, operation in item.items():
            yield method, path, operation


def test_path_parameters_carry_the_rules_the_views_enforce(document):
    for method, path, operation in _operations(document):
        for parameter in operation["parameters"]:
            if parameter["in"] != "path":
                continue
            schema, name = parameter["schema"], parameter["name"]
            if name in ("name", "alias"):
                assert schema == {"type": "string", "pattern": contracts.NAME_PATTERN}, (method, path)
            elif name == "version":
                assert schema == {"type": "integer", "minimum": 1, "maximum": contracts.MAX_VERSION} \
                    and contracts.MAX_VERSION == INT64_MAX, (method, path)


def test_every_list_declares_its_page_size_range_and_token_format(document):
    lists = [(method, path, operation) for method, path, operation in _operations(document)
             if any(p["name"] == "page_token" for p in operation["parameters"])]
    assert len(lists) >= 10  # datasets, a dataset, jobs, models, a model: GET and HEAD
    for method, _path, operation in lists:
        query = {p["name"]: p["schema"] for p in operation["parameters"] if p["in"] == "query"}
        assert query["page_size"]["minimum"] == 1 and query["page_size"]["maximum"] == contracts.MAX_PAGE_SIZE
        assert query["page_size"]["default"] == contracts.DEFAULT_PAGE_SIZE
        assert query["page_token"]["pattern"] == contracts.PAGE_TOKEN_PATTERN
        if method == "get":  # a page leads to the next one
            link = operation["responses"]["200"]["links"]["NextPage"]
            assert link["parameters"]["page_token"] == "$response.body#/next_page_token"


def test_the_page_token_pattern_admits_what_the_services_issue():
    import base64
    import json

    issued = [base64.urlsafe_b64encode(raw).decode() for raw in
              (json.dumps(["2026-01-01T00:00:00+00:00", "0a9f"]).encode(), b"7", b"ab", b"name-42")]
    pattern = contracts.ecma_regex(contracts.PAGE_TOKEN_PATTERN)
    assert all(pattern.search(token) for token in issued)
    assert not any(pattern.search(bad) for bad in ("a b", "abc", "ab=c", "ab/+", "ab==\n"))


def test_statuses_and_content_types_are_what_the_operations_answer(document):
    paths = document["paths"]
    create_key = paths["/v1/api-keys"]["post"]["responses"]
    assert "201" in create_key and "200" not in create_key
    assert set(paths["/v1/api-keys/{key_id}"]["delete"]["responses"]) >= {"204", "401", "403", "404", "429"}
    assert list(paths["/metrics"]["get"]["responses"]["200"]["content"]) == [CONTENT_TYPE_LATEST]
    for events in ("/v1/training-jobs/{id}/events", "/v1/datasets/{name}/versions/{version}/events"):
        assert list(paths[events]["get"]["responses"]["200"]["content"]) == ["text/event-stream"]
        assert "304" not in paths[events]["get"]["responses"]  # a stream has no ETag to match
    assert set(paths["/v1/completions"]["post"]["responses"]["200"]["content"]) == {"application/json",
                                                                                    "text/event-stream"}
    assert {"200", "201", "202"} <= set(paths["/v1/datasets"]["post"]["responses"])
    assert "202" in paths["/v1/training-jobs/{id}"]["delete"]["responses"]
    alias = paths["/v1/models/{name}/aliases/{alias}"]["put"]["responses"]
    assert {"201", "200", "412", "428", "415", "413"} <= set(alias)
    for method, path, operation in _operations(document):
        for status, answer in operation["responses"].items():
            if int(status) >= 400 and method != "head":
                assert answer["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Error"}
        if operation["security"]:
            assert {"401", "403", "422", "429", "503"} <= set(operation["responses"]), (method, path)


def test_creates_link_to_their_reads_and_every_link_names_an_operation(document):
    ids = {operation["operationId"] for _, _, operation in _operations(document)}
    links = {(method, path): answer.get("links", {}) for method, path, operation in _operations(document)
             for answer in operation["responses"].values() if answer.get("links")}
    assert {"get_v1_datasets_name_versions_version", "get_v1_datasets_name_versions_version_events"} <= {
        link["operationId"] for link in links[("post", "/v1/datasets")].values()}
    assert {"get_v1_training_jobs_id", "get_v1_training_jobs_id_events"} <= {
        link["operationId"] for link in links[("post", "/v1/training-jobs")].values()}
    assert links[("post", "/v1/api-keys")]["RevokeKey"]["operationId"] == "delete_v1_api_keys_key_id"
    assert links[("put", "/v1/deployments/{name}")]["GetDeployment"]["parameters"] == {"name": "$request.path.name"}
    for found in links.values():
        assert all(link["operationId"] in ids for link in found.values())


def test_a_new_route_gets_the_derived_contract_from_its_declaration():
    body = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 1}}}
    route = Route("POST", "/v1/things/{name}/versions/{version}/copies", handler, "Copy a thing", body=body,
                  query={"wait": {"type": "boolean"}}, headers={"If-Match": {"type": "string"}},
                  responses={202: "Accepted", 409: "Busy"}, returns={"type": "object", "required": ["id"]},
                  links={"GetCopy": Link("GET", "/v1/copies/{id}", {"id": "$response.body#/id"})})
    read = Route("GET", "/v1/copies/{id}", handler, "A copy")
    operation = openapi.document([route, read])["paths"][route.path]["post"]
    assert set(operation["responses"]) == {"202", "400", "401", "403", "404", "409", "412", "413", "415", "422",
                                           "429", "503"}
    assert operation["responses"]["202"]["links"]["GetCopy"]["operationId"] == "get_v1_copies_id"
    assert operation["responses"]["202"]["content"]["application/json"]["schema"] == route.returns
    parameters = {p["name"]: p["schema"] for p in operation["parameters"]}
    assert parameters["name"]["pattern"] == contracts.NAME_PATTERN and parameters["version"]["minimum"] == 1
    assert parameters["If-Match"] == {"type": "string"}
    public = openapi.document([Route("GET", "/ping", handler, "Ping", roles=())])["paths"]["/ping"]["get"]
    assert set(public["responses"]) == {"200", "304", "429"} and public["security"] == []


def test_the_gateway_enforces_every_query_schema_a_route_declares():
    route = Route("GET", "/v1/things", handler, "Things", required_query=("name",),
                  query={"name": {"type": "string", "pattern": contracts.NAME_PATTERN}, "wait": {"type": "boolean"},
                         "n": {"type": "integer", "minimum": 1, "maximum": 9},
                         "state": {"type": "array", "items": {"enum": ["A", "B"]}}})
    validate_query(route, MultiDict([("name", "ok"), ("wait", "true"), ("n", "9"), ("state", "A"), ("state", "B")]))
    for bad, field in [([("wait", "true")], "name"), ([("name", "Bad!")], "name"),
                       ([("name", "ok"), ("wait", "perhaps")], "wait"), ([("name", "ok"), ("n", "10")], "n"),
                       ([("name", "ok"), ("n", "1.0")], "n"), ([("name", "ok"), ("state", "C")], "state"),
                       ([("name", "ok"), ("n", "1"), ("n", "2")], "n"), ([("name", "ok"), ("tenant", "x")], "tenant")]:
        with pytest.raises(errors.ValidationFailed) as refused:
            validate_query(route, MultiDict(bad))
        assert field in refused.value.message, (bad, refused.value.message)

