"""Thin gRPC handlers of `llmp.inference.v1.InferenceService`: validate, convert, call the domain."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import AsyncIterator
from contextlib import aclosing

from google.protobuf.timestamp_pb2 import Timestamp
from llmp.inference.v1 import inference_pb2, inference_pb2_grpc

from services.common import contracts
from services.common.errors import Conflict, NotFound, PreconditionFailed, ValidationFailed
from services.common.identity import REQUEST_ID_KEY, caller_from_context
from services.common.merge import merged
from services.inference import embeddings, metrics
from services.inference.canary import CanaryController, RolloutPolicy
from services.inference.deployments import Deployments, DeploymentSpec
from services.inference.generation import (
    Chunk,
    GenerationStats,
    TokenLogprob,
    encode_prompt,
    generate,
    render_chat,
)
from services.inference.sampling import SamplingParams
from services.inference.triton_engine import TritonEngine

# A lone stream's first text gets this long on its way out (to the gateway, to the client) before its second
# step goes to Triton: once a step runs, ONNX Runtime's threads take every core, and the gateway or the client,
# woken to forward or read the first token, waited for one (8-16 ms in 9 of 40 requests on a busy machine, up to
# a whole step on a quiet one: bench/RESULTS.md, ninth session). The first token's way out takes ~2 ms; a
# stream ends this much later (~0.1 ms per token at 32 tokens). Only with Triton's models on the CPU
# (LLMP_TRITON_INSTANCE_KIND=KIND_CPU, server.py): on GPUs a step leaves the cores free.
FIRST_TEXT_HEADSTART_S = 0.003


def sampling_params(message: inference_pb2.SamplingParameters) -> SamplingParams:
    return SamplingParams(
        temperature=message.temperature, top_p=message.top_p or 1.0, top_k=message.top_k,
        seed=message.seed if message.HasField("seed") else None, stop=tuple(message.stop),
        presence_penalty=message.presence_penalty, frequency_penalty=message.frequency_penalty,
    ).validate()


def choice_count(request: inference_pb2.GenerateRequest) -> int:
    n = request.n or 1
    if not 1 <= n <= contracts.MAX_CHOICES:
        raise ValidationFailed(f"n must be between 1 and {contracts.MAX_CHOICES}, not {n}")
    if not 0 <= request.top_logprobs <= contracts.MAX_TOP_LOGPROBS:
        raise ValidationFailed(f"top_logprobs must be between 0 and {contracts.MAX_TOP_LOGPROBS}, "
                               f"not {request.top_logprobs}")
    if request.top_logprobs and not request.logprobs:
        raise ValidationFailed("top_logprobs needs logprobs")
    if request.prompt_logprobs and (not request.logprobs or request.messages):
        raise ValidationFailed("prompt_logprobs needs logprobs and a prompt (not messages)")
    if request.messages and request.prompt:
        raise ValidationFailed("give prompt or messages, not both")
    return n


def logprob_messages(entries: list[TokenLogprob]) -> list[inference_pb2.TokenLogprob]:
    return [inference_pb2.TokenLogprob(
        token_id=entry.token_id, token=entry.token, logprob=entry.logprob, token_bytes=entry.raw,
        top_logprobs=[inference_pb2.TokenLogprob(token_id=token_id, token=token, logprob=logprob, token_bytes=raw)
                      for token_id, token, logprob, raw in entry.top])
        for entry in entries]


def _timestamp(value) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(value)
    return stamp


def rollout_policy(message: inference_pb2.CanaryRollout) -> RolloutPolicy:
    """The fields the client set; the others take RolloutPolicy's defaults."""
    fields = {field.name: value for field, value in message.ListFields()}
    return RolloutPolicy.from_dict(fields)


def rollout_message(status: dict) -> inference_pb2.CanaryRolloutStatus:
    policy = status["policy"]
    return inference_pb2.CanaryRolloutStatus(
        state=status["state"], step=status["step"], weight=status["weight"], reason=status["reason"],
        canary_version=status["canary_version"],
        policy=inference_pb2.CanaryRollout(**policy),
        events=[inference_pb2.CanaryEvent(kind=e["kind"], at=_timestamp(e["at"]), from_weight=e["from_weight"],
                                          to_weight=e["to_weight"], reason=e["reason"],
                                          observed_json=json.dumps(e["observed"], sort_keys=True))
                for e in status["events"]])


def representation_etag(row: dict, status: dict | None) -> str:
    """The deployment's ETag, covering its rollout too: the row's own tag while there has been no rollout.

    Every visible change of a rollout records an event or starts a new rollout, so (rollout id, events)
    identifies its content.
    """
    if status is None:
        return row["etag"]
    content = f"{row['etag']}|{status['id']}|{len(status['events'])}"
    return '"' + hashlib.sha256(content.encode()).hexdigest()[:32] + '"'


def deployment_message(deployments: Deployments, tenant: str, row: dict,
                       status: dict | None = None) -> inference_pb2.Deployment:
    """The deployment as clients see it; `status`: its latest rollout (CanaryController.status), if any."""
    message = inference_pb2.Deployment(
        name=row["name"], model=row["model"], stable_version=row["stable_version"], state=row["state"],
        message=row["message"], etag=representation_etag(row, status), created_at=_timestamp(row["created_at"]),
        updated_at=_timestamp(row["updated_at"]), triton_models=deployments.triton_models(tenant, row))
    if row["canary_version"]:
        message.canary.CopyFrom(inference_pb2.Canary(version=row["canary_version"], weight=row["canary_weight"]))
    if status is not None:
        message.rollout.CopyFrom(rollout_message(status))
    return message


def version_stats_message(stats: metrics.VersionStats, serving: bool, weight: int) -> inference_pb2.ServedVersionStats:
    message = inference_pb2.ServedVersionStats(
        model=stats.model, version=stats.version, role="canary" if stats.canary else "stable", serving=serving,
        weight=weight if serving else 0, requests=int(stats.requests), errors=int(stats.errors),
        error_rate=round(stats.error_rate, 6), prompt_tokens=int(stats.prompt_tokens),
        completion_tokens=int(stats.completion_tokens))
    for name, value in (("latency_mean_s", stats.latency.mean()), ("latency_p50_s", stats.latency.quantile(0.5)),
                        ("latency_p99_s", stats.latency.quantile(0.99)),
                        ("time_to_first_token_mean_s", stats.first_token.mean()),
                        ("time_to_first_token_p99_s", stats.first_token.quantile(0.99))):
        if value is not None:
            setattr(message, name, round(value, 6))
    return message


def deployment_metrics_message(tenant: str, row: dict) -> inference_pb2.GetDeploymentMetricsResponse:
    """This process's figures for a deployment: the versions it routes to now (stable, then canary, zeros when
    they served nothing yet), then every other (model, version, track) it served before, newest first."""
    found = metrics.deployment_stats(tenant, row["name"])
    current = [((row["model"], row["stable_version"], False), 100 - (row["canary_weight"] or 0))]
    if row["canary_version"]:
        current.append(((row["model"], row["canary_version"], True), row["canary_weight"] or 0))
    versions = [version_stats_message(found.pop(key, None) or metrics.VersionStats(*key), True, weight)
                for key, weight in current]
    for key in sorted(found, key=lambda k: (k[0] != row["model"], k[0], -k[1], k[2])):
        versions.append(version_stats_message(found[key], False, 0))
    since = Timestamp()
    since.FromNanoseconds(int(metrics.STARTED_AT * 1e9))
    return inference_pb2.GetDeploymentMetricsResponse(name=row["name"], model=row["model"], versions=versions,
                                                      replica=metrics.replica(), since=since)



class InferenceServicer(inference_pb2_grpc.InferenceServiceServicer):
    def __init__(self, deployments: Deployments, engine: TritonEngine, canary: CanaryController,
                 first_text_headstart: bool = True) -> None:
        self.deployments = deployments
        self.engine = engine
        self.canary = canary
        self.first_text_headstart = first_text_headstart  # False: none (Triton's models on GPUs)

    async def _rollout(self, tenant: str, name: str) -> dict | None:
        try:
            return await self.canary.status(tenant, name)
        except NotFound:
            return None

    async def _message(self, tenant: str, row: dict) -> inference_pb2.Deployment:
        return deployment_message(self.deployments, tenant, row, await self._rollout(tenant, row["name"]))

    async def _row_etag(self, tenant: str, name: str, if_match: str) -> str:
        """The row's ETag that the client's If-Match (a representation_etag) stands for; "" for no condition.

        The rollout part is checked here, the row part atomically by the change itself.
        """
        if not if_match:
            return ""
        try:
            row = await self.deployments.get(tenant, name)
        except NotFound:
            return if_match  # the change reports the missing deployment itself
        if representation_etag(row, await self._rollout(tenant, name)) != if_match:
            raise PreconditionFailed(f"deployment {name!r} does not match If-Match {if_match}")
        return row["etag"]

    async def _chunks(self, request: inference_pb2.GenerateRequest, context,
                      stream_text: bool = True) -> AsyncIterator[tuple[int, Chunk, object]]:
        """(choice index, chunk, (served version, canary)) of every choice, as they are generated."""
        caller = caller_from_context(context)
        if not request.deployment:
            raise ValidationFailed("deployment must be set")
        params = sampling_params(request.sampling)
        n = choice_count(request)
        routing_key = request.routing_key or dict(context.invocation_metadata() or ()).get(REQUEST_ID_KEY, "")
        served, canary = await self.deployments.route(caller.tenant, request.deployment, routing_key)
        embeddings.require_decoder(served, request.deployment)
        stop_token_ids = None
        prompt = request.prompt
        if not request.messages and request.max_tokens < 1:  # 0 (the rest of the context) is for chat answers
            raise ValidationFailed(f"max_tokens must be at least 1, not {request.max_tokens}")
        if request.messages:
            prompt = render_chat(served, [{"role": m.role, "content": m.content} for m in request.messages])
            stop_token_ids = served.end_of_turn_ids
        prompt_ids = await encode_prompt(served, prompt, request.max_tokens)
        max_tokens = request.max_tokens or served.spec.context_length - len(prompt_ids)
        remaining = context.time_remaining()
        deadline = time.monotonic() + remaining if remaining is not None else None
        labels = (caller.tenant, request.deployment, served.model, str(served.version), "true" if canary else "false")
        stats = [GenerationStats() for _ in range(n)]
        routed = (served, canary)
        outcome = "error"
        self.deployments.acquire(served)
        try:
            streams = [generate(self.engine, served, prompt_ids, max_tokens, params, deadline=deadline,
                                stats=stats[index], stream_text=stream_text, stop_token_ids=stop_token_ids,
                                logprobs=request.logprobs, top_logprobs=request.top_logprobs, choice=index,
                                prompt_logprobs=request.prompt_logprobs)
                       for index in range(n)]
            if n == 1:
                async with aclosing(streams[0]) as chunks:
                    async for chunk in chunks:
                        yield 0, chunk, routed
            else:
                async with aclosing(merged(streams)) as chunks:
                    async for index, chunk in chunks:
                        yield index, chunk, routed
            outcome = "ok"
        finally:
            self.deployments.release(served)
            metrics.REQUESTS.labels(*labels, outcome).inc()
            metrics.LATENCY.labels(*labels).observe(time.perf_counter() - stats[0].started)
            first_tokens = [item.first_token_s for item in stats if item.first_token_s is not None]
            if first_tokens:
                metrics.FIRST_TOKEN.labels(*labels).observe(min(first_tokens))
            metrics.TOKENS.labels(*labels, "prompt").inc(stats[0].prompt_tokens)
            metrics.TOKENS.labels(*labels, "completion").inc(sum(item.completion_tokens for item in stats))

    async def Generate(self, request, context):  # noqa: N802 (gRPC method names)
        n = request.n or 1
        text = [[] for _ in range(n)]
        ids = [[] for _ in range(n)]
        logprobs = [[] for _ in range(n)]
        prompt_logprobs = [[] for _ in range(n)]
        last: list[Chunk | None] = [None] * n
        routed = (None, False)
        async with aclosing(self._chunks(request, context, stream_text=False)) as chunks:
            async for index, chunk, where in chunks:
                routed = where
                text[index].append(chunk.text)
                ids[index].extend(chunk.token_ids)
                logprobs[index].extend(chunk.logprobs)
                prompt_logprobs[index].extend(chunk.prompt_logprobs)
                last[index] = chunk
        served, canary = routed
        choices = [inference_pb2.Completion(
            text="".join(text[index]), token_ids=ids[index], finish_reason=last[index].finish_reason,
            prompt_tokens=last[index].prompt_tokens, completion_tokens=last[index].completion_tokens,
            model=served.model, model_version=served.version, canary=canary, index=index,
            logprobs=logprob_messages(logprobs[index]), prompt_logprobs=logprob_messages(prompt_logprobs[index]))
            for index in range(n)]
        return inference_pb2.GenerateResponse(completion=choices[0], choices=choices if n > 1 else [])

    async def GenerateStream(self, request, context):  # noqa: N802 (gRPC method names)
        """The chunks as they come. Pulling the next chunk sends the next step (`generate`), so after the first
        text of a stream that is alone on its model the pull waits FIRST_TEXT_HEADSTART_S: the text reaches the
        gateway and the client before the step's ORT call takes the cores. With other sequences on the model
        it does not wait: their steps run anyway, and waiting would only make this stream miss the next batch."""
        headstart = request.request.n <= 1 and self.first_text_headstart
        async with aclosing(self._chunks(request.request, context)) as chunks:
            async for index, chunk, (served, canary) in chunks:
                message = inference_pb2.GenerateStreamResponse(
                    text=chunk.text, token_ids=chunk.token_ids, finish_reason=chunk.finish_reason, index=index)
                if chunk.logprobs:
                    message.logprobs.extend(logprob_messages(chunk.logprobs))
                if chunk.prompt_logprobs:
                    message.prompt_logprobs.extend(logprob_messages(chunk.prompt_logprobs))
                if chunk.finish_reason:
                    message.summary.CopyFrom(inference_pb2.Completion(
                        finish_reason=chunk.finish_reason, prompt_tokens=chunk.prompt_tokens,
                        completion_tokens=chunk.completion_tokens, model=served.model,
                        model_version=served.version, canary=canary, index=index))
                yield message
                if headstart and chunk.text and not chunk.finish_reason:
                    headstart = False
                    if self.engine.open_sequences(served.triton_name) <= 1:
                        await asyncio.sleep(FIRST_TEXT_HEADSTART_S)

    async def PutDeployment(self, request, context):  # noqa: N802 (gRPC method names)
        caller = caller_from_context(context)
        stable = request.stable_version
        if stable <= 0:
            if not request.stable_alias:
                raise ValidationFailed("give a stable version or a stable alias")
            stable = await self.deployments.source.resolve(caller.tenant, request.model, 0, request.stable_alias)
        canary = request.canary if request.HasField("canary") else None
        if_match = await self._row_etag(caller.tenant, request.name, request.if_match)
        if canary is not None and canary.HasField("rollout"):
            row = await self._begin_rollout(caller.tenant, request, stable, canary, if_match)
            return inference_pb2.PutDeploymentResponse(deployment=await self._message(caller.tenant, row),
                                                       created=False)
        spec = DeploymentSpec(request.name, request.model, stable, canary.version if canary else None,
                              canary.weight if canary else 0)
        row, created = await self.deployments.put(caller.tenant, spec, if_match=if_match,
                                                  if_none_match=request.if_none_match, wait=request.wait)
        return inference_pb2.PutDeploymentResponse(deployment=await self._message(caller.tenant, row),
                                                   created=created)

    async def _begin_rollout(self, tenant: str, request, stable: int, canary, if_match: str) -> dict:
        """A rollout changes only the canary of an existing deployment: model and stable must be as they are.
        Either rule broken is 409: the request is well formed, the deployment's state (absent, or another
        model) is what refuses it."""
        policy = rollout_policy(canary.rollout)
        if request.if_none_match == "*":
            raise Conflict("a canary rollout needs an existing deployment; create it first")
        current = await self.deployments.get(tenant, request.name)
        if (current["model"], current["stable_version"]) != (request.model, stable):
            raise Conflict(
                f"a canary rollout keeps the deployment's model and stable version ({current['model']} "
                f"v{current['stable_version']}); change those in a PUT without a rollout")
        await self.canary.begin(tenant, request.name, canary.version, policy, if_match=if_match, wait=request.wait)
        return await self.deployments.get(tenant, request.name)

    async def GetDeployment(self, request, context):  # noqa: N802 (gRPC method names)
        caller = caller_from_context(context)
        row = await self.deployments.get(caller.tenant, request.name)
        return inference_pb2.GetDeploymentResponse(deployment=await self._message(caller.tenant, row))

    async def ListDeployments(self, request, context):  # noqa: N802 (gRPC method names)
        caller = caller_from_context(context)
        rows = await self.deployments.list(caller.tenant)
        return inference_pb2.ListDeploymentsResponse(
            deployments=[await self._message(caller.tenant, row) for row in rows])

    async def Embed(self, request, context):  # noqa: N802 (gRPC method names)
        caller = caller_from_context(context)
        if not request.deployment:
            raise ValidationFailed("deployment must be set")
        routing_key = request.routing_key or dict(context.invocation_metadata() or ()).get(REQUEST_ID_KEY, "")
        served, canary = await self.deployments.route(caller.tenant, request.deployment, routing_key)
        embeddings.require_encoder(served, request.deployment)
        remaining = context.time_remaining()
        labels = (caller.tenant, request.deployment, served.model, str(served.version), "true" if canary else "false")
        self.deployments.acquire(served)
        try:
            vectors, tokens = await embeddings.embed(self.engine, served, list(request.inputs), labels=labels,
                                                     timeout=remaining)
        finally:
            self.deployments.release(served)
        return inference_pb2.EmbedResponse(
            embeddings=[inference_pb2.Embedding(values=vector.tolist(), tokens=count)
                        for vector, count in zip(vectors, tokens, strict=True)],
            model=served.model, model_version=served.version, canary=canary)

    async def GetDeploymentMetrics(self, request, context):  # noqa: N802 (gRPC method names)
        caller = caller_from_context(context)
        row = await self.deployments.get(caller.tenant, request.name)
        return deployment_metrics_message(caller.tenant, row)

    async def DeleteDeployment(self, request, context):  # noqa: N802 (gRPC method names)
        caller = caller_from_context(context)
        if_match = await self._row_etag(caller.tenant, request.name, request.if_match)
        await self.deployments.delete(caller.tenant, request.name, if_match=if_match)
        return inference_pb2.DeleteDeploymentResponse()

