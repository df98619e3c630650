"""`/v1/deployments/{name}`: a model's stable version (and optional weighted canary) on Triton."""

from __future__ import annotations

import json

from aiohttp import web
from llmp.inference.v1 import inference_pb2

from gateway.http import Link, Route, clients, int32, int64, json_response, message_schema, read_json, to_dict
from services.common import contracts, errors

ROLLOUT = {
    "type": "object", "additionalProperties": False,
    "description": "automatic rollout (services/inference/canary.py); unset fields take the defaults",
    "properties": {
        "steps": {"type": "array", "minItems": 1, "maxItems": 100, "uniqueItems": True,
                  "items": int32(1, 100),
                  "contains": {"const": 100},
                  "description": "the canary weights to pass through, taken in increasing order; 100 promotes"},
        "interval_s": {"type": "number", "minimum": 0},
        "min_requests": int32(1),
        "max_error_rate_delta": {"type": "number", "minimum": 0, "maximum": 1},
        "max_latency_ratio": {"type": "number", "minimum": 1},
        "latency_statistic": {"enum": ["p95", "mean"]},
    },
}
PUT_DEPLOYMENT = {
    "type": "object", "additionalProperties": False, "required": ["model", "stable"],
    "properties": {
        "model": {"type": "string", "pattern": contracts.NAME_PATTERN},
        "stable": {"oneOf": [int64(1), {"type": "string", "pattern": contracts.NAME_PATTERN}],
                   "description": "a version number or an alias"},
        "canary": {"type": ["object", "null"], "additionalProperties": False, "required": ["version"],
                   "properties": {"version": int64(1), "weight": int32(0, 100),
                                  "rollout": ROLLOUT},
                   "anyOf": [{"required": ["weight"]}, {"required": ["rollout"]}],
                   "description": "a fixed weight, or a rollout that advances the weight by itself"},
    },
}


_OPTIONAL_FIGURES = ("latency_mean_s", "latency_p50_s", "latency_p99_s", "time_to_first_token_mean_s",
                     "time_to_first_token_p99_s")
# What `present` and `present_metrics` make of a deployment and its figures.
_ROLLOUT_EVENT = message_schema(inference_pb2.CanaryRolloutStatus.DESCRIPTOR.fields_by_name["events"].message_type,
                                observed={"type": "object"})
DEPLOYMENT_BODY = message_schema(
    inference_pb2.Deployment.DESCRIPTOR, stable={"type": "integer"},
    canary={"anyOf": [message_schema(inference_pb2.Canary.DESCRIPTOR), {"type": "null"}]},
    rollout={"anyOf": [message_schema(inference_pb2.CanaryRolloutStatus.DESCRIPTOR,
                                      events={"type": "array", "items": _ROLLOUT_EVENT}), {"type": "null"}]})
DEPLOYMENT_BODY["required"] = ["name", "model", "stable", "canary", "rollout"]
DEPLOYMENT_LIST = {"type": "object", "required": ["deployments"],
                   "properties": {"deployments": {"type": "array", "items": DEPLOYMENT_BODY}}}
_FIGURES = inference_pb2.GetDeploymentMetricsResponse.DESCRIPTOR.fields_by_name["versions"].message_type
DEPLOYMENT_METRICS = message_schema(
    inference_pb2.GetDeploymentMetricsResponse.DESCRIPTOR,
    versions={"type": "array", "items": message_schema(_FIGURES, nullable=_OPTIONAL_FIGURES)})


def present(deployment: inference_pb2.Deployment) -> dict:
    body = to_dict(deployment)
    body["stable"] = body.pop("stable_version")
    body["canary"] = to_dict(deployment.canary) if deployment.HasField("canary") else None
    body["rollout"] = _present_rollout(deployment.rollout) if deployment.HasField("rollout") else None
    return body


def _present_rollout(rollout: inference_pb2.CanaryRolloutStatus) -> dict:
    body = to_dict(rollout)
    for event in body["events"]:
        event["observed"] = json.loads(event.pop("observed_json") or "{}")
    return body


def _etag(deployment: inference_pb2.Deployment) -> str:
    return deployment.etag  # already a quoted entity-tag


async def list_deployments(request: web.Request) -> web.Response:
    response = await clients(request).inference.ListDeployments(inference_pb2.ListDeploymentsRequest())
    return json_response(request, {"deployments": [present(d) for d in response.deployments]})


async def get_deployment(request: web.Request) -> web.Response:
    response = await clients(request).inference.GetDeployment(
        inference_pb2.GetDeploymentRequest(name=request.match_info["name"]))
    return json_response(request, present(response.deployment), etag=_etag(response.deployment))


async def put_deployment(request: web.Request) -> web.Response:
    """Create (If-None-Match: *) or change (If-Match) a deployment; the service checks the ETag atomically,
    exports the version to ONNX first when it has no export yet (state EXPORTING; a failed export or parity
    gate ends it FAILED with the reason), loads it (LOADING), waits for Triton to report it ready, then moves
    traffic (READY)."""
    body = await read_json(request, PUT_DEPLOYMENT)
    name = request.match_info["name"]
    if_match, if_none_match = request.headers.get("If-Match", ""), request.headers.get("If-None-Match", "")
    if not if_match and not if_none_match:
        # The API's rule: changing an existing deployment needs If-Match (428); creating one needs no header, but
        # is sent as If-None-Match: * so a deployment created meanwhile is not silently overwritten.
        try:
            await clients(request).inference.GetDeployment(inference_pb2.GetDeploymentRequest(name=name))
        except errors.NotFound:
            if_none_match = "*"
        else:
            raise errors.PreconditionRequired(f"deployment {name!r} exists: changing it needs If-Match with its ETag")
    stable = body["stable"]
    message = inference_pb2.PutDeploymentRequest(
        name=name, model=body["model"],
        stable_version=stable if isinstance(stable, int) else 0,
        stable_alias=stable if isinstance(stable, str) else "",
        if_match=if_match, if_none_match=if_none_match, wait=False)
    canary = body.get("canary")
    if canary:
        message.canary.CopyFrom(inference_pb2.Canary(version=canary["version"], weight=canary.get("weight", 0)))
        if "rollout" in canary:
            rollout = dict(canary["rollout"])
            if "steps" in rollout:  # a set of weights (the schema refuses repeats), passed through in order
                rollout["steps"] = sorted(rollout["steps"])
            message.canary.rollout.CopyFrom(inference_pb2.CanaryRollout(**rollout))
    response = await clients(request).inference.PutDeployment(message, timeout=600)
    return json_response(request, present(response.deployment), status=201 if response.created else 200,
                         cache_control="no-store", etag=_etag(response.deployment))


async def delete_deployment(request: web.Request) -> web.Response:
    await clients(request).inference.DeleteDeployment(inference_pb2.DeleteDeploymentRequest(
        name=request.match_info["name"], if_match=request.headers.get("If-Match", "")), timeout=120)
    return web.Response(status=204, headers={"Cache-Control": "no-store"})




def present_metrics(response: inference_pb2.GetDeploymentMetricsResponse) -> dict:
    body = to_dict(response)
    for version in body["versions"]:
        for name in _OPTIONAL_FIGURES:
            version.setdefault(name, None)  # null until the version served a request (a first token)
    return body


async def deployment_metrics(request: web.Request) -> web.Response:
    """What each version of the deployment served: requests, errors, latency, time to first token, tokens.

    The figures are the answering inference process's (since `since`, by `replica`); each replica counts its own.
    """
    response = await clients(request).inference.GetDeploymentMetrics(
        inference_pb2.GetDeploymentMetricsRequest(name=request.match_info["name"]))
    return json_response(request, present_metrics(response))

DEPLOYMENT = "/v1/deployments/{name}"
_OF_DEPLOYMENT = {"name": "$request.path.name"}
ROUTES = [
    Route("GET", "/v1/deployments", list_deployments, "List deployments", tag="deployments", returns=DEPLOYMENT_LIST),
    Route("GET", DEPLOYMENT, get_deployment, "A deployment: versions, canary weight, state", tag="deployments",
          returns=DEPLOYMENT_BODY),
    Route("PUT", DEPLOYMENT, put_deployment, "Deploy (If-None-Match: * to create, If-Match to change); "
          "a version without an ONNX export is exported first (EXPORTING, then LOADING, READY or FAILED)",
          body=PUT_DEPLOYMENT, tag="deployments", returns=DEPLOYMENT_BODY,
          headers={"If-Match": {"type": "string"}, "If-None-Match": {"type": "string"}},
          links={"GetDeployment": Link("GET", DEPLOYMENT, _OF_DEPLOYMENT),
                 "DeploymentMetrics": Link("GET", DEPLOYMENT + "/metrics", _OF_DEPLOYMENT),
                 "DeleteDeployment": Link("DELETE", DEPLOYMENT, _OF_DEPLOYMENT)},
          responses={200: "Changed", 201: "Created", 409: "The change conflicts with the deployment's state",
                     412: "ETag mismatch", 428: "The deployment exists: changing it needs If-Match"}),
    Route("DELETE", DEPLOYMENT, delete_deployment, "Drain and delete a deployment", tag="deployments",
          headers={"If-Match": {"type": "string"}}, responses={204: "Deleted"}),
    Route("GET", DEPLOYMENT + "/metrics", deployment_metrics,
          "Serving figures per version and track (requests, errors, latency p50/p99, time to first token, tokens), "
          "as counted by the answering inference process", tag="deployments", returns=DEPLOYMENT_METRICS),
]
