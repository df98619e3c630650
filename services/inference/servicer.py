"""Thin gRPC handlers of `llmp.inference.v1.InferenceService`: validate, convert, call the domain."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import aclosing

from google.protobuf.timestamp_pb2 import Timestamp
from llmp.inference.v1 import inference_pb2, inference_pb2_grpc

from services.common.errors import ValidationFailed
from services.common.grpc_server import REQUEST_ID_KEY, caller_from_context
from services.inference import metrics
from services.inference.deployments import Deployments, DeploymentSpec
from services.inference.generation import Chunk, GenerationStats, encode_prompt, generate
from services.inference.sampling import SamplingParams
from services.inference.triton_engine import TritonEngine


def sampling_params(message: inference_pb2.SamplingParameters) -> SamplingParams:
    return SamplingParams(
        temperature=message.temperature, top_p=message.top_p or 1.0, top_k=message.top_k,
        seed=message.seed if message.HasField("seed") else None, stop=tuple(message.stop),
    ).validate()


def _timestamp(value) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(value)
    return stamp


def deployment_message(deployments: Deployments, tenant: str, row: dict) -> inference_pb2.Deployment:
    message = inference_pb2.Deployment(
        name=row["name"], model=row["model"], stable_version=row["stable_version"], state=row["state"],
        message=row["message"], etag=row["etag"], created_at=_timestamp(row["created_at"]),
        updated_at=_timestamp(row["updated_at"]), triton_models=deployments.triton_models(tenant, row))
    if row["canary_version"]:
        message.canary.CopyFrom(inference_pb2.Canary(version=row["canary_version"], weight=row["canary_weight"]))
    return message


class InferenceServicer(inference_pb2_grpc.InferenceServiceServicer):
    def __init__(self, deployments: Deployments, engine: TritonEngine) -> None:
        self.deployments = deployments
        self.engine = engine

    async def _chunks(self, request: inference_pb2.GenerateRequest, context,
                      stream_text: bool = True) -> AsyncIterator[tuple[Chunk, object]]:
        caller = caller_from_context(context)
        if not request.deployment:
            raise ValidationFailed("deployment must be set")
        params = sampling_params(request.sampling)
        routing_key = request.routing_key or dict(context.invocation_metadata() or ()).get(REQUEST_ID_KEY, "")
        served, canary = await self.deployments.route(caller.tenant, request.deployment, routing_key)
        prompt_ids = encode_prompt(served, request.prompt, request.max_tokens)
        remaining = context.time_remaining()
        deadline = time.monotonic() + remaining if remaining is not None else None
        labels = (request.deployment, served.model, str(served.version), "true" if canary else "false")
        stats = GenerationStats()
        outcome = "error"
        self.deployments.acquire(served)
        try:
            async with aclosing(generate(self.engine, served, prompt_ids, request.max_tokens, params,
                                         deadline=deadline, stats=stats, stream_text=stream_text)) as chunks:
                async for chunk in chunks:
                    yield chunk, (served, canary)
            outcome = "ok"
        finally:
            self.deployments.release(served)
            metrics.REQUESTS.labels(*labels, outcome).inc()
            metrics.LATENCY.labels(*labels).observe(time.perf_counter() - stats.started)
            if stats.first_token_s is not None:
                metrics.FIRST_TOKEN.labels(*labels).observe(stats.first_token_s)
            metrics.TOKENS.labels(*labels, "prompt").inc(stats.prompt_tokens)
            metrics.TOKENS.labels(*labels, "completion").inc(stats.completion_tokens)

    async def Generate(self, request, context):  # noqa: N802 (gRPC method names)
        text, ids, last, routed = [], [], None, (None, False)
        async with aclosing(self._chunks(request, context, stream_text=False)) as chunks:
            async for chunk, where in chunks:
                text.append(chunk.text)
                ids.extend(chunk.token_ids)
                last, routed = chunk, where
        served, canary = routed
        return inference_pb2.GenerateResponse(completion=inference_pb2.Completion(
            text="".join(text), token_ids=ids, finish_reason=last.finish_reason, prompt_tokens=last.prompt_tokens,
            completion_tokens=last.completion_tokens, model=served.model, model_version=served.version,
            canary=canary))

    async def GenerateStream(self, request, context):  # noqa: N802 (gRPC method names)
        async with aclosing(self._chunks(request.request, context)) as chunks:
            async for chunk, (served, canary) in chunks:
                message = inference_pb2.GenerateStreamResponse(
                    text=chunk.text, token_ids=chunk.token_ids, finish_reason=chunk.finish_reason)
                if chunk.finish_reason:
                    message.summary.CopyFrom(inference_pb2.Completion(
                        finish_reason=chunk.finish_reason, prompt_tokens=chunk.prompt_tokens,
                        completion_tokens=chunk.completion_tokens, model=served.model,
                        model_version=served.version, canary=canary))
                yield message

    async def PutDeployment(self, request, context):  # noqa: N802 (gRPC method names)
        caller = caller_from_context(context)
        stable = request.stable_version
        if stable <= 0:
            if not request.stable_alias:
                raise ValidationFailed("give a stable version or a stable alias")
            stable = await self.deployments.source.resolve(caller.tenant, request.model, 0, request.stable_alias)
        canary = request.canary if request.HasField("canary") else None
        spec = DeploymentSpec(request.name, request.model, stable, canary.version if canary else None,
                              canary.weight if canary else 0)
        row, created = await self.deployments.put(caller.tenant, spec, if_match=request.if_match,
                                                  if_none_match=request.if_none_match, wait=request.wait)
        return inference_pb2.PutDeploymentResponse(
            deployment=deployment_message(self.deployments, caller.tenant, row), created=created)

    async def GetDeployment(self, request, context):  # noqa: N802 (gRPC method names)
        caller = caller_from_context(context)
        row = await self.deployments.get(caller.tenant, request.name)
        message = deployment_message(self.deployments, caller.tenant, row)
        return inference_pb2.GetDeploymentResponse(deployment=message)

    async def ListDeployments(self, request, context):  # noqa: N802 (gRPC method names)
        caller = caller_from_context(context)
        rows = await self.deployments.list(caller.tenant)
        return inference_pb2.ListDeploymentsResponse(
            deployments=[deployment_message(self.deployments, caller.tenant, row) for row in rows])

    async def DeleteDeployment(self, request, context):  # noqa: N802 (gRPC method names)
        caller = caller_from_context(context)
        await self.deployments.delete(caller.tenant, request.name, if_match=request.if_match)
        return inference_pb2.DeleteDeploymentResponse()

