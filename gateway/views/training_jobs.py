"""`/v1/training-jobs…`: submit, follow (JSON, metrics, Server-Sent Events) and cancel training jobs."""

from __future__ import annotations

import json

from aiohttp import web
from google.protobuf import json_format
from llmp.training.v1 import training_pb2

from gateway.http import PAGING, Route, clients, json_response, page, read_json, responses, to_dict
from services.common import contracts, errors

_POSITIVE = {"type": "integer", "minimum": 1}
_FRACTION = {"type": "number", "minimum": 0, "maximum": 1}
SUBMIT_JOB = {
    "type": "object", "additionalProperties": False, "required": ["dataset", "model"],
    "properties": {
        "dataset": {"type": "object", "additionalProperties": False, "required": ["name", "version"],
                    "properties": {"name": {"type": "string", "pattern": contracts.NAME_PATTERN},
                                   "version": _POSITIVE}},
        "model": {
            "type": "object", "additionalProperties": False, "required": ["family"],
            "properties": {
                "family": {"enum": list(contracts.MODEL_FAMILIES)}, "n_layer": _POSITIVE, "n_head": _POSITIVE,
                "n_embd": _POSITIVE, "block_size": _POSITIVE, "dropout": _FRACTION,
                "init_from": {"type": "object", "additionalProperties": False, "required": ["name", "version"],
                              "properties": {"name": {"type": "string", "pattern": contracts.NAME_PATTERN},
                                             "version": _POSITIVE}},
            },
        },
        "hyperparameters": {
            "type": "object", "additionalProperties": False,
            "properties": {
                "batch_size": _POSITIVE, "max_steps": _POSITIVE,
                "learning_rate": {"type": "number", "exclusiveMinimum": 0},
                "min_learning_rate": {"type": "number", "minimum": 0},
                "warmup_steps": {"type": "integer", "minimum": 0},
                "weight_decay": {"type": "number", "minimum": 0}, "beta1": _FRACTION, "beta2": _FRACTION,
                "grad_clip": {"type": "number", "minimum": 0}, "grad_accum": _POSITIVE, "eval_interval": _POSITIVE,
                "eval_batches": _POSITIVE, "early_stopping_patience": {"type": "integer", "minimum": 0},
                "checkpoint_interval": _POSITIVE, "log_interval": _POSITIVE,
                "precision": {"enum": list(contracts.PRECISIONS)},
                "seed": {"type": "integer", "minimum": 0}, "mlm_probability": _FRACTION,
            },
        },
        "distributed": {
            "type": "object", "additionalProperties": False, "required": ["mode"],
            "properties": {"mode": {"enum": list(contracts.DISTRIBUTED_MODES)}, "nproc_per_node": _POSITIVE,
                           "nnodes": _POSITIVE, "sync_interval": _POSITIVE},
        },
        "priority": {"type": "integer", "minimum": contracts.MIN_PRIORITY, "maximum": contracts.MAX_PRIORITY},
        "model_name": {"type": "string", "pattern": contracts.NAME_PATTERN},
    },
}


def present_job(job: training_pb2.Job) -> dict:
    body = to_dict(job)
    if not job.HasField("model_version"):
        body["model_version"] = None
    return body


async def submit_job(request: web.Request) -> web.Response:
    body = await read_json(request, SUBMIT_JOB)
    key = request.headers.get("Idempotency-Key", "")
    if len(key) > contracts.MAX_IDEMPOTENCY_KEY:
        raise errors.ValidationFailed(f"Idempotency-Key: at most {contracts.MAX_IDEMPOTENCY_KEY} characters")
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
        name = f"JOB_STATE_{state.upper()}"
        if name not in training_pb2.JobState.keys():
            raise errors.ValidationFailed(f"state: unknown job state {state!r}")
        states.append(training_pb2.JobState.Value(name))
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
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store",
                                               "X-Accel-Buffering": "no"})
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
ROUTES = [
    Route("POST", "/v1/training-jobs", submit_job, "Submit a training job (Idempotency-Key honoured)",
          body=SUBMIT_JOB, tag="training", responses={409: "Idempotency-Key reused with another spec"}),
    Route("GET", "/v1/training-jobs", list_jobs, "List training jobs",
          query={"state": {"type": "string"}, **PAGING},
          tag="training"),
    Route("GET", JOB, get_job, "A job's state, progress and latest metrics", tag="training"),
    Route("DELETE", JOB, cancel_job, "Cancel a job", tag="training"),
    Route("GET", JOB + "/metrics", job_metrics, "Loss curves, learning rate, tokens/s", tag="training"),
    Route("GET", JOB + "/events", job_events, "Live events (text/event-stream)", tag="training"),
]
