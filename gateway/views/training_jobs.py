"""`/v1/training-jobs…`: submit, follow (JSON, metrics, Server-Sent Events) and cancel training jobs."""

from __future__ import annotations

import json

from aiohttp import web
from google.protobuf import json_format
from llmp.training.v1 import training_pb2

from gateway.http import (
    EVENT_STREAM,
    EVENT_STREAM_HEADERS,
    PAGING,
    Link,
    Route,
    clients,
    idempotency_key,
    int32,
    int64,
    json_response,
    message_schema,
    page,
    read_json,
    responses,
    to_dict,
)
from services.common import contracts, errors

_NAME = {"type": "string", "pattern": contracts.NAME_PATTERN}


def _number(minimum: float, maximum: float | None = None, *, open_below: bool = False, open_above: bool = False
            ) -> dict:
    schema: dict = {"type": "number", ("exclusiveMinimum" if open_below else "minimum"): minimum}
    if maximum is not None:
        schema["exclusiveMaximum" if open_above else "maximum"] = maximum
    return schema


# Bounds: the training service's own rules (services/training/spec.py), within the protobuf field types
# (JobSpec); tests/unit/gateway/test_request_numbers.py keeps the two in step.
MAX_STEPS = 10_000_000
SUBMIT_JOB = {
    "type": "object", "additionalProperties": False, "required": ["dataset", "model"],
    "properties": {
        "dataset": {"type": "object", "additionalProperties": False, "required": ["name", "version"],
                    "properties": {"name": _NAME, "version": int64(1)}},
        # `family` may be left out: gpt2 from scratch, the version's own architecture with init_from.
        "model": {
            "type": "object", "additionalProperties": False,
            "properties": {
                "family": {"enum": list(contracts.FINETUNE_FAMILIES)}, "n_layer": int32(1, 128),
                "n_head": int32(1, 128), "n_embd": int32(1, 16384), "block_size": int32(2, 32768),
                "dropout": _number(0, 1, open_above=True),
                "init_from": {"type": "object", "additionalProperties": False, "required": ["name", "version"],
                              "properties": {"name": _NAME, "version": int64(1)}},
                "adapter": {
                    "type": "object", "additionalProperties": False, "required": ["type"],
                    "properties": {
                        "type": {"enum": list(contracts.ADAPTER_TYPES)}, "r": int32(1, 1024),
                        "alpha": _number(0, 65536, open_below=True), "dropout": _number(0, 1, open_above=True),
                        "target_modules": {"type": "array", "maxItems": 64, "uniqueItems": True,
                                           "items": {"type": "string", "pattern": "^[A-Za-z_][A-Za-z0-9_]{0,63}$"}},
                    },
                },
            },
        },
        "hyperparameters": {
            "type": "object", "additionalProperties": False,
            "properties": {
                "batch_size": int32(1, 65536), "max_steps": int64(1, MAX_STEPS),
                "learning_rate": _number(0, 1, open_below=True), "min_learning_rate": _number(0, 1),
                "warmup_steps": int64(0, MAX_STEPS), "weight_decay": _number(0, 1),
                "beta1": _number(0, 1, open_above=True), "beta2": _number(0, 1, open_above=True),
                "grad_clip": _number(0), "grad_accum": int32(1, 4096), "eval_interval": int64(1),
                "eval_batches": int32(1), "early_stopping_patience": int32(0), "checkpoint_interval": int64(0),
                "log_interval": int64(1), "precision": {"enum": list(contracts.PRECISIONS)},
                "seed": int64(0, 2**32 - 1),
                "mlm_probability": _number(0, 1, open_below=True, open_above=True),
            },
        },
        "distributed": {
            "type": "object", "additionalProperties": False, "required": ["mode"],
            "properties": {"mode": {"enum": list(contracts.DISTRIBUTED_MODES)}, "nproc_per_node": int32(1, 64),
                           "nnodes": int32(1, 64), "sync_interval": int32(1)},
        },
        "priority": int32(contracts.MIN_PRIORITY, contracts.MAX_PRIORITY),
        "model_name": _NAME,
    },
}
# ?state=: a job state as jobs show it (QUEUED), or in lower case; repeat it for several.
JOB_STATES = {spelling: value for name, value in training_pb2.JobState.items() if value
              for spelling in (name.removeprefix("JOB_STATE_"), name.removeprefix("JOB_STATE_").lower())}
JOB_QUERY = {"state": {"type": "array", "items": {"enum": list(JOB_STATES)}}, **PAGING}
JOB_BODY = message_schema(training_pb2.Job.DESCRIPTOR, nullable=("model_version",))
JOB_BODY["required"] = ["id", "state"]
JOB_LIST = {"type": "object", "required": ["jobs", "next_page_token"], "properties": {
    "jobs": {"type": "array", "items": JOB_BODY},
    "next_page_token": {"type": "string", "pattern": contracts.PAGE_TOKEN_PATTERN}}}
JOB_METRICS = message_schema(training_pb2.GetJobMetricsResponse.DESCRIPTOR)


def present_job(job: training_pb2.Job) -> dict:
    body = to_dict(job)
    if not job.HasField("model_version"):
        body["model_version"] = None
    return body


async def submit_job(request: web.Request) -> web.Response:
    body = await read_json(request, SUBMIT_JOB)
    key = idempotency_key(request)
    spec_fields = {name: body[name] for name in ("dataset", "model", "hyperparameters", "distributed") if name in body}
    try:
        spec = json_format.ParseDict(spec_fields, training_pb2.JobSpec())
    except json_format.ParseError as error:
        raise errors.ValidationFailed(str(error)) from None
    response = await clients(request).training.SubmitJob(training_pb2.SubmitJobRequest(
        spec=spec, idempotency_key=key, priority=body.get("priority", 0), model_name=body.get("model_name", "")))
    headers = {"Location": f"/v1/training-jobs/{response.job.id}"}
    return json_response(request, present_job(response.job), status=202 if response.created else 200,
                         cache_control="no-store", headers=headers)


async def list_jobs(request: web.Request) -> web.Response:
    states = []
    for state in request.query.getall("state", []):
        if state not in JOB_STATES:
            raise errors.ValidationFailed(f"state: unknown job state {state!r}")
        states.append(JOB_STATES[state])
    response = await clients(request).training.ListJobs(training_pb2.ListJobsRequest(
        page=page(request), states=states))
    return json_response(request, {"jobs": [present_job(job) for job in response.jobs],
                                   "next_page_token": response.page.next_page_token})


async def get_job(request: web.Request) -> web.Response:
    response = await clients(request).training.GetJob(training_pb2.GetJobRequest(id=request.match_info["id"]))
    return json_response(request, present_job(response.job))


async def job_metrics(request: web.Request) -> web.Response:
    response = await clients(request).training.GetJobMetrics(
        training_pb2.GetJobMetricsRequest(id=request.match_info["id"]))
    return json_response(request, to_dict(response))


async def cancel_job(request: web.Request) -> web.Response:
    response = await clients(request).training.CancelJob(training_pb2.CancelJobRequest(id=request.match_info["id"]))
    return json_response(request, present_job(response.job), status=202, cache_control="no-store")


async def job_events(request: web.Request) -> web.StreamResponse:
    """Live events as Server-Sent Events; `Last-Event-ID` resumes after the last one received."""
    last = request.headers.get("Last-Event-ID", "0")
    after = int(last) if last.isdigit() else 0
    message = training_pb2.WatchJobRequest(id=request.match_info["id"], after_sequence=after)
    with responses(clients(request).training.WatchJob(message)) as events:
        # Ask for the first event before committing to a 200, so an unknown job is a proper 404.
        first = await anext(events, None)
        response = web.StreamResponse(headers=EVENT_STREAM_HEADERS)
        await response.prepare(request)
        event = first
        while event is not None:
            kind = event.WhichOneof("event") or "message"
            payload = to_dict(event)
            await response.write(f"id: {event.sequence}\nevent: {kind}\ndata: {json.dumps(payload)}\n\n".encode())
            event = await anext(events, None)
    await response.write(b"data: [DONE]\n\n")
    return response


JOB = "/v1/training-jobs/{id}"
_OF_JOB = {"id": "$response.body#/id"}
ROUTES = [
    Route("POST", "/v1/training-jobs", submit_job, "Submit a training job (Idempotency-Key honoured)",
          body=SUBMIT_JOB, tag="training", returns=JOB_BODY,
          headers={"Idempotency-Key": {"type": "string", "maxLength": contracts.MAX_IDEMPOTENCY_KEY}},
          links={"GetJob": Link("GET", JOB, _OF_JOB), "JobEvents": Link("GET", JOB + "/events", _OF_JOB),
                 "JobMetrics": Link("GET", JOB + "/metrics", _OF_JOB), "CancelJob": Link("DELETE", JOB, _OF_JOB)},
          responses={202: "Accepted, QUEUED", 200: "Same Idempotency-Key and spec: the existing job",
                     404: "The dataset version (or init_from model version) does not exist",
                     409: "Idempotency-Key reused with another spec, or the dataset version is not READY or too "
                          "small for the spec"}),
    Route("GET", "/v1/training-jobs", list_jobs, "List training jobs", query=JOB_QUERY, tag="training",
          returns=JOB_LIST, links={"NextPage": Link("GET", "/v1/training-jobs",
                                                    {"page_token": "$response.body#/next_page_token"})}),
    Route("GET", JOB, get_job, "A job's state, progress and latest metrics", tag="training", returns=JOB_BODY),
    Route("DELETE", JOB, cancel_job, "Cancel a job", tag="training", returns=JOB_BODY,
          responses={202: "Cancellation requested (a cancelled job is answered as it is)",
                     409: "The job already finished (SUCCEEDED or FAILED): nothing is left to cancel"}),
    Route("GET", JOB + "/metrics", job_metrics, "Loss curves, learning rate, tokens/s", tag="training",
          returns=JOB_METRICS),
    Route("GET", JOB + "/events", job_events, "Live events (text/event-stream)", tag="training",
          media_type=EVENT_STREAM, headers={"Last-Event-ID": {"type": "string"}}),
]
