"""gRPC handlers of `llmp.training.v1.TrainingService`: read the caller, convert, call the coordinator."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from google.protobuf import json_format, struct_pb2
from google.protobuf.message import Message
from llmp.common.v1 import common_pb2
from llmp.training.v1 import training_pb2, training_pb2_grpc

from services.common.errors import InvalidArgument
from services.common.identity import caller_from_context
from services.training.coordinator import Coordinator, Event, Job, JobKind, JobState

_STATE_PREFIX = "JOB_STATE_"
# Series GetJobMetrics returns as curves; every other metric is reported once, in `final`.
SERIES = ("train_loss", "validation_loss", "learning_rate", "tokens_per_second", "validation_perplexity", "mfu")


def message_to_dict(message: Message) -> dict[str, Any]:
    """The fields the sender set (proto3 `optional` presence, non-default plain scalars), natively typed.

    Unset fields stay absent so the spec's defaults apply (unlike MessageToDict, int64s stay ints).
    """
    values: dict[str, Any] = {}
    for field, value in message.ListFields():
        if field.is_repeated:
            values[field.name] = [message_to_dict(item) if field.message_type is not None else item for item in value]
        else:
            values[field.name] = message_to_dict(value) if field.message_type is not None else value
    return values


def spec_to_proto(spec: dict[str, Any]) -> training_pb2.JobSpec:
    return json_format.ParseDict(spec, training_pb2.JobSpec(), ignore_unknown_fields=True)


def state_to_proto(state: JobState) -> int:
    return training_pb2.JobState.Value(_STATE_PREFIX + state.value)


def state_from_proto(value: int) -> JobState:
    name = training_pb2.JobState.Name(value) if value in training_pb2.JobState.values() else ""
    if not name or value == training_pb2.JOB_STATE_UNSPECIFIED:
        raise InvalidArgument(f"states: {value} is not a job state")
    return JobState(name.removeprefix(_STATE_PREFIX))


def _timestamp(message, field: str, value) -> None:
    if value is not None:
        getattr(message, field).FromDatetime(value)


def job_to_proto(job: Job) -> training_pb2.Job:
    message = training_pb2.Job(
        id=job.id, state=state_to_proto(job.state), spec=spec_to_proto(job.spec), priority=job.priority,
        idempotency_key=job.idempotency_key or "", model_name=job.model_name,
        progress=common_pb2.Progress(phase="train", done=job.step, total=job.max_steps, unit="steps",
                                     message=job.error),
        latest_metrics=training_pb2.MetricsSnapshot(step=job.metrics_step, values=job.latest_metrics),
        error=job.error, attempt=job.attempt, cancel_requested=job.cancel_requested,
        output_prefix=job.output_prefix)
    if job.model_version is not None:
        message.model_version.CopyFrom(common_pb2.ModelRef(name=job.model_name, version=job.model_version))
    environment = struct_pb2.Struct()
    environment.update(job.environment)
    message.environment.CopyFrom(environment)
    for field in ("created_at", "started_at", "finished_at", "updated_at"):
        _timestamp(message, field, getattr(job, field))
    return message


def event_to_proto(event: Event) -> training_pb2.WatchJobResponse:
    message = training_pb2.WatchJobResponse(sequence=event.sequence)
    message.time.FromDatetime(event.created_at)
    payload = event.payload
    if event.kind == "state":
        message.state_changed.CopyFrom(training_pb2.StateChanged(
            state=state_to_proto(JobState(payload["state"])), reason=payload.get("reason", ""),
            attempt=payload.get("attempt", 0)))
    elif event.kind == "progress":
        message.progress.CopyFrom(common_pb2.Progress(phase="train", done=payload["step"],
                                                      total=payload.get("max_steps", 0), unit="steps"))
    elif event.kind == "metrics":
        message.metrics.CopyFrom(training_pb2.MetricsRecorded(step=payload["step"], values=payload["values"]))
    elif event.kind == "checkpoint":
        message.checkpoint.CopyFrom(training_pb2.CheckpointSaved(step=payload.get("step") or 0,
                                                                 prefix=payload.get("prefix", "")))
    return message


@dataclass(frozen=True)
class EvaluationTarget:
    """What the service learnt checking an evaluation request (server.evaluation_checker)."""

    manifest_key: str


# (caller, (model, version), (dataset, version), split) -> the target; raises naming what is wrong.
EvaluationCheck = Callable[[Any, tuple[str, int], tuple[str, int], str], Awaitable[EvaluationTarget]]


def evaluation_to_proto(job: Job) -> training_pb2.Evaluation:
    spec = job.spec
    message = training_pb2.Evaluation(
        id=job.id, state=state_to_proto(job.state),
        model=common_pb2.ModelRef(name=spec["model"]["name"], version=int(spec["model"]["version"])),
        dataset=common_pb2.DatasetRef(name=spec["dataset"]["name"], version=int(spec["dataset"]["version"])),
        split=spec["split"],
        progress=common_pb2.Progress(phase="evaluate", done=job.step, total=job.max_steps, unit="batches",
                                     message=job.error),
        metrics=job.latest_metrics if job.state == JobState.SUCCEEDED else {}, error=job.error,
        attempt=job.attempt, cancel_requested=job.cancel_requested, idempotency_key=job.idempotency_key or "",
        exclude_contaminated=bool(spec.get("exclude_contaminated")))
    found = job.environment.get("contamination")
    if found:
        done = job.state == JobState.SUCCEEDED
        message.contamination.CopyFrom(training_pb2.Contamination(
            share=found["share"], documents=found["documents"], contaminated=found["contaminated"],
            datasets=found["datasets"], all_metrics=found.get("all_metrics", {}) if done else {},
            clean_metrics=found.get("clean_metrics", {}) if done else {}))
    for field in ("created_at", "started_at", "finished_at"):
        _timestamp(message, field, getattr(job, field))
    return message


class TrainingServicer(training_pb2_grpc.TrainingServiceServicer):
    def __init__(self, coordinator: Coordinator, check_evaluation: EvaluationCheck | None = None) -> None:
        self.coordinator = coordinator
        self.check_evaluation = check_evaluation

    async def SubmitEvaluation(self, request, context):  # noqa: N802
        caller = caller_from_context(context)
        split = request.split or "test"
        model, dataset = (request.model.name, request.model.version), (request.dataset.name, request.dataset.version)
        for label, (name, number) in (("model", model), ("dataset", dataset)):
            if not name or number < 1:
                raise InvalidArgument(f"{label}: a name and a version from 1 are required")
        body = {"model": {"name": model[0], "version": model[1]},
                "dataset": {"name": dataset[0], "version": dataset[1]}, "split": split}
        if request.exclude_contaminated:  # only when asked: the specs of earlier submits stay as they were
            body["exclude_contaminated"] = True
        if self.check_evaluation is None:
            raise InvalidArgument("this training service does not evaluate")
        target = await self.check_evaluation(caller, model, dataset, split)
        job, created = await self.coordinator.submit_evaluation(
            caller, body, model_version=model[1], manifest_key=target.manifest_key,
            idempotency_key=request.idempotency_key)
        return training_pb2.SubmitEvaluationResponse(evaluation=evaluation_to_proto(job), created=created)

    async def GetEvaluation(self, request, context):  # noqa: N802
        job = await self.coordinator.get(caller_from_context(context).tenant, request.id, JobKind.EVALUATION)
        return training_pb2.GetEvaluationResponse(evaluation=evaluation_to_proto(job))

    async def ListEvaluations(self, request, context):  # noqa: N802
        jobs, token = await self.coordinator.evaluations(
            caller_from_context(context).tenant, model_name=request.model_name, model_version=request.model_version,
            page_size=request.page.page_size, page_token=request.page.page_token)
        return training_pb2.ListEvaluationsResponse(evaluations=[evaluation_to_proto(job) for job in jobs],
                                                    page=common_pb2.PageResponse(next_page_token=token))

    async def CancelEvaluation(self, request, context):  # noqa: N802
        job = await self.coordinator.cancel(caller_from_context(context).tenant, request.id, JobKind.EVALUATION)
        return training_pb2.CancelEvaluationResponse(evaluation=evaluation_to_proto(job))

    async def SubmitJob(self, request, context):  # noqa: N802 (gRPC method names)
        caller = caller_from_context(context)
        job, created = await self.coordinator.submit(
            caller, message_to_dict(request.spec), idempotency_key=request.idempotency_key,
            priority=request.priority, model_name=request.model_name)
        return training_pb2.SubmitJobResponse(job=job_to_proto(job), created=created)

    async def GetJob(self, request, context):  # noqa: N802
        job = await self.coordinator.get(caller_from_context(context).tenant, request.id)
        return training_pb2.GetJobResponse(job=job_to_proto(job))

    async def ListJobs(self, request, context):  # noqa: N802
        tenant = caller_from_context(context).tenant
        jobs, token = await self.coordinator.list(
            tenant, states=[state_from_proto(value) for value in request.states],
            page_size=request.page.page_size, page_token=request.page.page_token)
        return training_pb2.ListJobsResponse(jobs=[job_to_proto(job) for job in jobs],
                                             page=common_pb2.PageResponse(next_page_token=token))

    async def CancelJob(self, request, context):  # noqa: N802
        job = await self.coordinator.cancel(caller_from_context(context).tenant, request.id)
        return training_pb2.CancelJobResponse(job=job_to_proto(job))

    async def GetJobMetrics(self, request, context):  # noqa: N802
        series = await self.coordinator.metrics(caller_from_context(context).tenant, request.id)
        response = training_pb2.GetJobMetricsResponse()
        for name, points in series.items():
            if name in SERIES:
                target = getattr(response, name)
                for step, value, recorded_at in points:
                    point = target.add(step=step, value=value)
                    point.time.FromDatetime(recorded_at)
            else:
                response.final[name] = points[-1][1]
        return response

    async def WatchJob(self, request, context) -> AsyncIterator[training_pb2.WatchJobResponse]:  # noqa: N802
        tenant = caller_from_context(context).tenant
        async for event in self.coordinator.watch(tenant, request.id, request.after_sequence):
            yield event_to_proto(event)
