"""`/v1/models…`: the registry — versions, lineage, aliases with history, exports."""

from __future__ import annotations

import json
import logging

from aiohttp import web
from llmp.common.v1 import common_pb2
from llmp.registry.v1 import registry_pb2
from llmp.training.v1 import training_pb2

from gateway.http import (
    PAGING,
    Link,
    Route,
    caller,
    check_if_match,
    clients,
    etag_of,
    int64,
    json_response,
    message_schema,
    page,
    path_version,
    read_json,
    to_dict,
)
from gateway.views import evaluations
from services.common import contracts, errors

SET_ALIAS = {
    "type": "object", "additionalProperties": False, "required": ["version"],
    "properties": {"version": int64(1),
                   "reason": {"type": "string", "maxLength": 500, "pattern": contracts.TEXT_PATTERN}},
}
GATE = {
    "type": "object", "additionalProperties": False, "required": ["dataset", "metric", "max_regression"],
    "properties": {
        "dataset": {"type": "object", "additionalProperties": False, "required": ["name", "version"],
                    "properties": {"name": {"type": "string", "pattern": contracts.NAME_PATTERN},
                                   "version": int64(1)}},
        "split": {"enum": evaluations.SPLITS},
        "metric": {"enum": ["loss", "perplexity", "expected_calibration_error", "token_accuracy"]},
        "max_regression": {"type": "number", "minimum": 0, "maximum": 10,
                           "description": "relative, e.g. 0.02: the new version may be 2% worse at most"},
    },
}
CREATE_EXPORT = {
    "type": "object", "additionalProperties": False, "required": ["format"],
    "properties": {"format": {"enum": list(contracts.EXPORT_FORMATS)}},
}

log = logging.getLogger(__name__)


# What `present_version` makes of a version (name and version at the top, parity reports as objects).
_PARITY = {"parity": {"type": ["object", "null"]}}
EXPORT_BODY = message_schema(registry_pb2.Export.DESCRIPTOR, **_PARITY)
VERSION_BODY = message_schema(registry_pb2.ModelVersion.DESCRIPTOR, name={"type": "string"},
                              version={"type": "integer"}, exports={"type": "array", "items": EXPORT_BODY})
VERSION_BODY["required"] = ["name", "version", "state"]
# GET of one version also shows its evaluations (newest first; the training service keeps them).
ONE_VERSION_BODY = {**VERSION_BODY, "properties": {
    **VERSION_BODY["properties"], "evaluations": {"type": "array", "items": evaluations.EVALUATION_BODY}}}
_NEXT = {"next_page_token": {"type": "string", "pattern": contracts.PAGE_TOKEN_PATTERN}}
MODEL_LIST = {"type": "object", "required": ["models", "next_page_token"], "properties": {
    "models": {"type": "array", "items": message_schema(registry_pb2.Model.DESCRIPTOR)}, **_NEXT}}
MODEL_BODY = message_schema(registry_pb2.Model.DESCRIPTOR, versions={"type": "array", "items": VERSION_BODY},
                            **_NEXT)
ALIAS_BODY = message_schema(registry_pb2.Alias.DESCRIPTOR)
GATE_BODY = message_schema(registry_pb2.AliasGate.DESCRIPTOR)
ALIAS_HISTORY = {"type": "object", "required": ["entries"], "properties": {
    "entries": {"type": "array", "items": message_schema(registry_pb2.AliasHistoryEntry.DESCRIPTOR)}}}


def present_version(version: registry_pb2.ModelVersion) -> dict:
    """A model version as the API shows it: name/version at the top, parity reports as objects."""
    body = to_dict(version)
    body["name"], body["version"] = version.ref.name, version.ref.version
    for export in body.get("exports", []):
        report = export.pop("parity_report_json", "")
        export["parity"] = json.loads(report) if report else None
    return body


async def list_models(request: web.Request) -> web.Response:
    response = await clients(request).registry.ListModels(registry_pb2.ListModelsRequest(page=page(request)))
    return json_response(request, {"models": [to_dict(model) for model in response.models],
                                   "next_page_token": response.page.next_page_token})


async def get_model(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    model = await clients(request).registry.GetModel(registry_pb2.GetModelRequest(name=name))
    versions = await clients(request).registry.ListModelVersions(
        registry_pb2.ListModelVersionsRequest(name=name, page=page(request)))
    return json_response(request, {**to_dict(model.model),
                                   "versions": [present_version(v) for v in versions.versions],
                                   "next_page_token": versions.page.next_page_token})


async def get_version(request: web.Request) -> web.Response:
    response = await clients(request).registry.GetModelVersion(registry_pb2.GetModelVersionRequest(
        name=request.match_info["name"], version=path_version(request)))
    body = present_version(response.version)
    try:
        measured = await clients(request).training.ListEvaluations(training_pb2.ListEvaluationsRequest(
            model_name=response.version.ref.name, model_version=response.version.ref.version))
        body["evaluations"] = [evaluations.present(item) for item in measured.evaluations]
    except (errors.Unavailable, errors.DeadlineExceeded):
        # The version is the registry's; its evaluations are the training service's. One backend down must
        # not hide the other's answer: the version is shown without them (the key is absent, not empty).
        log.warning("evaluations of %s v%d unavailable", response.version.ref.name, response.version.ref.version)
    # READY versions are immutable except for exports, aliases and evaluations, which the ETag covers.
    return json_response(request, body)


async def delete_version(request: web.Request) -> web.Response:
    name, version = request.match_info["name"], path_version(request)
    if request.headers.get("If-Match"):
        current = await clients(request).registry.GetModelVersion(
            registry_pb2.GetModelVersionRequest(name=name, version=version))
        check_if_match(request, etag_of(present_version(current.version)), required=False)
    await clients(request).registry.DeleteModelVersion(
        registry_pb2.DeleteModelVersionRequest(name=name, version=version))
    return web.Response(status=204, headers={"Cache-Control": "no-store"})


def _alias_etag(alias: registry_pb2.Alias) -> str:
    return f'"{alias.etag}"'


async def get_alias(request: web.Request) -> web.Response:
    response = await clients(request).registry.GetAlias(registry_pb2.GetAliasRequest(
        model_name=request.match_info["name"], alias=request.match_info["alias"]))
    return json_response(request, to_dict(response.alias), etag=_alias_etag(response.alias))


async def put_alias(request: web.Request) -> web.Response:
    """Create with If-None-Match: *, move with If-Match: <ETag>; the registry checks atomically."""
    body = await read_json(request, SET_ALIAS)
    if_match = request.headers.get("If-Match", "").strip()
    must_not_exist = request.headers.get("If-None-Match", "").strip() == "*"
    if not if_match and not must_not_exist:
        raise errors.PreconditionRequired("moving an alias needs If-Match with its ETag; creating one needs "
                                          "If-None-Match: *")
    if if_match.startswith("W/"):
        raise errors.PreconditionFailed("If-Match needs a strong ETag")
    response = await clients(request).registry.SetAlias(registry_pb2.SetAliasRequest(
        model_name=request.match_info["name"], alias=request.match_info["alias"], version=body["version"],
        expected_etag=if_match.strip('"'), must_not_exist=must_not_exist, actor=caller(request).key_id,
        reason=body.get("reason", "")))
    return json_response(request, to_dict(response.alias), status=201 if must_not_exist else 200,
                         cache_control="no-store", etag=_alias_etag(response.alias))


async def put_gate(request: web.Request) -> web.Response:
    """Gate an alias: it then moves only to versions evaluated no worse on the gate's data (409 otherwise)."""
    body = await read_json(request, GATE)
    response = await clients(request).registry.PutAliasGate(registry_pb2.PutAliasGateRequest(
        gate=registry_pb2.AliasGate(
            model_name=request.match_info["name"], alias=request.match_info["alias"],
            dataset=common_pb2.DatasetRef(**body["dataset"]), split=body.get("split", "test"),
            metric=body["metric"], max_regression=body["max_regression"])))
    return json_response(request, to_dict(response.gate), cache_control="no-store")


async def get_gate(request: web.Request) -> web.Response:
    response = await clients(request).registry.GetAliasGate(registry_pb2.GetAliasGateRequest(
        model_name=request.match_info["name"], alias=request.match_info["alias"]))
    return json_response(request, to_dict(response.gate))


async def alias_history(request: web.Request) -> web.Response:
    response = await clients(request).registry.ListAliasHistory(registry_pb2.ListAliasHistoryRequest(
        model_name=request.match_info["name"], alias=request.match_info["alias"]))
    return json_response(request, {"entries": [to_dict(entry) for entry in response.entries]})


async def create_export(request: web.Request) -> web.Response:
    body = await read_json(request, CREATE_EXPORT)
    response = await clients(request).registry.CreateExport(registry_pb2.CreateExportRequest(
        model=common_pb2.ModelRef(name=request.match_info["name"], version=path_version(request)),
        format=body["format"]))
    export = to_dict(response.export)
    report = export.pop("parity_report_json", "")
    export["parity"] = json.loads(report) if report else None
    return json_response(request, export, status=202, cache_control="no-store")


VERSION = "/v1/models/{name}/versions/{version}"
ALIAS = "/v1/models/{name}/aliases/{alias}"
_IF_MATCH = {"If-Match": {"type": "string"}}
_CONDITIONS = {**_IF_MATCH, "If-None-Match": {"type": "string"}}
_OF_ALIAS = {"name": "$request.path.name", "alias": "$request.path.alias"}
_OF_VERSION = {"name": "$request.path.name", "version": "$request.path.version"}
ROUTES = [
    Route("GET", "/v1/models", list_models, "List registered models", query=PAGING, tag="models", returns=MODEL_LIST,
          links={"NextPage": Link("GET", "/v1/models", {"page_token": "$response.body#/next_page_token"})}),
    Route("GET", "/v1/models/{name}", get_model, "A model with its versions and aliases", query=PAGING,
          tag="models", returns=MODEL_BODY,
          links={"NextPage": Link("GET", "/v1/models/{name}", {"name": "$request.path.name",
                                                               "page_token": "$response.body#/next_page_token"})}),
    Route("GET", VERSION, get_version,
          "A model version: artifacts with SHA-256, lineage, metrics, exports, evaluations",
          tag="models", returns=ONE_VERSION_BODY),
    Route("DELETE", VERSION, delete_version, "Delete a version (409 while deployed)", tag="models",
          headers=_IF_MATCH, responses={204: "Deleted", 409: "In use by a deployment"}),
    Route("GET", ALIAS, get_alias, "The version an alias points at", tag="models", returns=ALIAS_BODY),
    Route("PUT", ALIAS, put_alias, "Create (If-None-Match: *) or move (If-Match) an alias", body=SET_ALIAS,
          tag="models", headers=_CONDITIONS, returns=ALIAS_BODY,
          links={"GetAlias": Link("GET", ALIAS, _OF_ALIAS), "AliasHistory": Link("GET", ALIAS + "/history", _OF_ALIAS)},
          responses={200: "Moved", 201: "Created", 412: "ETag mismatch (or the alias exists, with If-None-Match: *)",
                     409: "A gated alias: evaluation pending (started), or the version measured worse than "
                          "the current target by more than the gate allows (both figures named)",
                     428: "Neither If-Match nor If-None-Match: * was sent"}),
    Route("PUT", ALIAS + "/gate", put_gate, "Gate an alias on evaluations (a promotion gate)", body=GATE,
          tag="models", returns=GATE_BODY, responses={404: "The model does not exist"}),
    Route("GET", ALIAS + "/gate", get_gate, "An alias's promotion gate", tag="models", returns=GATE_BODY,
          responses={404: "The alias has no gate"}),
    Route("GET", ALIAS + "/history", alias_history, "Audit trail of an alias's moves", tag="models",
          returns=ALIAS_HISTORY),
    Route("POST", VERSION + "/exports", create_export, "Export a version (onnx, onnx-int8, torchscript)",
          body=CREATE_EXPORT, tag="models", returns=EXPORT_BODY, responses={202: "Accepted: the export is built"},
          links={"GetVersion": Link("GET", VERSION, _OF_VERSION)}),
]
