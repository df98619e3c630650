"""`/v1/evaluations…`: evaluate a registered model version on a dataset split, and read the figures."""

from __future__ import annotations

from aiohttp import web
from llmp.common.v1 import common_pb2
from llmp.training.v1 import training_pb2

from gateway.http import (
    PAGING,
    Link,
    Route,
    clients,
    idempotency_key,
    int64,
    json_response,
    message_schema,
    page,
    read_json,
    to_dict,
)
from services.common import contracts, errors

_NAME = {"type": "string", "pattern": contracts.NAME_PATTERN}
_REF = {"type": "object", "additionalProperties": False, "required": ["name", "version"],
        "properties": {"name": _NAME, "version": int64(1)}}
SPLITS = list(contracts.EVALUATION_SPLITS)
SUBMIT_EVALUATION = {
    "type": "object", "additionalProperties": False, "required": ["model", "dataset"],
    "properties": {"model": _REF, "dataset": _REF, "split": {"enum": SPLITS},
                   "exclude_contaminated": {"type": "boolean", "description": (
                       "metrics leave out the documents found in the model's training data (default false); "
                       "contamination.all_metrics and contamination.clean_metrics report both either way")}},
}
EVALUATION_BODY = message_schema(training_pb2.Evaluation.DESCRIPTOR)
EVALUATION_BODY["required"] = ["id", "state"]
EVALUATION_LIST = {"type": "object", "required": ["evaluations", "next_page_token"], "properties": {
    "evaluations": {"type": "array", "items": EVALUATION_BODY},
    "next_page_token": {"type": "string", "pattern": contracts.PAGE_TOKEN_PATTERN}}}
# Each filter narrows on its own: ?version=N alone lists the evaluations of version N of every model.
LIST_QUERY = {"model": _NAME, "version": int64(1), **PAGING}


def present(evaluation: training_pb2.Evaluation) -> dict:
    body = to_dict(evaluation)
    body.setdefault("metrics", {})
    for unset in ("started_at", "finished_at"):
        body.setdefault(unset, None)
    return body


async def submit_evaluation(request: web.Request) -> web.Response:
    body = await read_json(request, SUBMIT_EVALUATION)
    key = idempotency_key(request)
    response = await clients(request).training.SubmitEvaluation(training_pb2.SubmitEvaluationRequest(
        model=common_pb2.ModelRef(**body["model"]), dataset=common_pb2.DatasetRef(**body["dataset"]),
        split=body.get("split", "test"), idempotency_key=key,
        exclude_contaminated=body.get("exclude_contaminated", False)))
    evaluation = response.evaluation
    return json_response(request, present(evaluation), status=202 if response.created else 200,
                         cache_control="no-store", headers={"Location": f"/v1/evaluations/{evaluation.id}"})


async def list_evaluations(request: web.Request) -> web.Response:
    model, version = request.query.get("model", ""), request.query.get("version", "")
    if model:
        contracts.validate_name(model, "model")
    if version and (not version.isdigit() or int(version) < 1 or int(version) >= 2**63):
        raise errors.ValidationFailed(f"version: a version number from 1, not {version!r}")
    response = await clients(request).training.ListEvaluations(training_pb2.ListEvaluationsRequest(
        model_name=model, model_version=int(version or 0), page=page(request)))
    return json_response(request, {"evaluations": [present(item) for item in response.evaluations],
                                   "next_page_token": response.page.next_page_token})


async def get_evaluation(request: web.Request) -> web.Response:
    response = await clients(request).training.GetEvaluation(
        training_pb2.GetEvaluationRequest(id=request.match_info["id"]))
    return json_response(request, present(response.evaluation))


async def cancel_evaluation(request: web.Request) -> web.Response:
    response = await clients(request).training.CancelEvaluation(
        training_pb2.CancelEvaluationRequest(id=request.match_info["id"]))
    return json_response(request, present(response.evaluation), status=202, cache_control="no-store")


EVALUATION = "/v1/evaluations/{id}"
_OF_EVALUATION = {"id": "$response.body#/id"}
ROUTES = [
    Route("POST", "/v1/evaluations", submit_evaluation,
          "Evaluate a model version on a dataset split: loss, perplexity, token accuracy, calibration error",
          body=SUBMIT_EVALUATION, tag="evaluations", returns=EVALUATION_BODY,
          headers={"Idempotency-Key": {"type": "string", "maxLength": contracts.MAX_IDEMPOTENCY_KEY}},
          links={"GetEvaluation": Link("GET", EVALUATION, _OF_EVALUATION),
                 "CancelEvaluation": Link("DELETE", EVALUATION, _OF_EVALUATION)},
          responses={202: "Accepted, QUEUED", 200: "Same Idempotency-Key and request: the existing evaluation",
                     404: "The model version or the dataset version does not exist",
                     409: "Idempotency-Key reused with another request, or a version is not READY"}),
    Route("GET", "/v1/evaluations", list_evaluations, "List evaluations (of a model, of a version)",
          query=LIST_QUERY, tag="evaluations", returns=EVALUATION_LIST,
          links={"NextPage": Link("GET", "/v1/evaluations", {"page_token": "$response.body#/next_page_token"})}),
    Route("GET", EVALUATION, get_evaluation, "An evaluation: state, progress, figures", tag="evaluations",
          returns=EVALUATION_BODY),
    Route("DELETE", EVALUATION, cancel_evaluation, "Cancel an evaluation", tag="evaluations",
          returns=EVALUATION_BODY,
          responses={202: "Cancellation requested (a cancelled evaluation is answered as it is)",
                     409: "The evaluation already finished (SUCCEEDED or FAILED): nothing is left to cancel"}),
]
