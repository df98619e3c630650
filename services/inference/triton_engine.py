"""The inference service's only way to Triton: `tritonclient`'s async gRPC client.

Loads and unloads models (explicit model control), reports readiness, and runs decoding steps (see
triton_model/model.py for the step protocol). Steps are batched here, before Triton: every sequence in
flight on a model submits its next step to that model's `StepBatcher`, which sends all steps queued
meanwhile as ONE Triton request (one row each) while the previous request runs. So N concurrent
generations cost one gRPC call per token, not N, and the sequences move in lockstep through one ORT
call per step. Greedy steps ask Triton only for the argmax (`NEXT_TOKEN`); sampling ones for the logits.

Triton failures become domain errors: unreachable → Unavailable with retry_after; a model not ready →
Unavailable; a deadline → DeadlineExceeded.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from dataclasses import dataclass, field

import grpc
import numpy as np
import tritonclient.grpc.aio as triton
from tritonclient.grpc import InferInput, InferRequestedOutput
from tritonclient.utils import InferenceServerException

from services.common.errors import BadRequest, DeadlineExceeded, Internal, LlmpError, Unavailable

log = logging.getLogger(__name__)

RETRY_AFTER_S = 2.0
LOAD_TIMEOUT_S = 300.0
STEP_TIMEOUT_S = 60.0  # one batched Triton call; each caller also waits no longer than its own deadline
MAX_BATCH = 64  # rows per Triton request: the model's max_batch_size (model_repository.BatchingConfig)


def new_sequence_id() -> int:
    """A random non-zero 63-bit id (Triton's uint64 ids; 0 is reserved)."""
    return secrets.randbits(63) | 1


def _domain_error(error: InferenceServerException, what: str):
    status = (error.status() or "").upper()
    message = error.message() or str(error)
    if "DEADLINE" in status:
        return DeadlineExceeded(f"{what}: deadline exceeded")
    if "UNAVAILABLE" in status or "failed to connect" in message.lower() or "connect" in status.lower():
        return Unavailable(f"Triton unreachable ({what}): {message}", retry_after=RETRY_AFTER_S)
    if "unknown model" in message.lower() or "is not ready" in message.lower() or "not found" in message.lower():
        return Unavailable(f"{what}: model not loaded in Triton ({message})", retry_after=RETRY_AFTER_S)
    if "context is" in message:
        return BadRequest(message)
    return Internal(f"Triton error ({what}): {message}")


@dataclass(frozen=True)
class StepResult:
    """What one step produced: the greedy next token, and the logits [vocab] when they were asked for."""

    next_token: int
    logits: np.ndarray | None = None


@dataclass
class _Step:
    sequence_id: int
    token_ids: list[int]
    start: bool
    end: bool
    logits: bool
    future: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class StepBatcher:
    """Gathers the steps of every sequence in flight on one Triton model into batched requests.

    A runner task exists while steps are queued: it sends what is queued as one request, sets each
    step's result, and repeats; with nothing queued it ends, and the next step starts a new one. Before
    sending it lets the event loop run (at most twice) while some open sequence has not queued its step
    yet, so every sequence whose previous step just finished joins the batch; when all have (a lone
    request always has), it sends at once: a batch window would only delay that sequence.
    """

    def __init__(self, engine: "TritonEngine", model: str, max_batch: int = MAX_BATCH) -> None:
        self.engine = engine
        self.model = model
        self.max_batch = max_batch
        self.pending: list[_Step] = []
        self.runner: asyncio.Task | None = None
        self.open_sequences: set[int] = set()  # started, not ended: their next steps are worth waiting for

    def submit(self, sequence_id: int, token_ids: list[int], *, start: bool, end: bool, logits: bool,
               timeout: float | None) -> asyncio.Future:
        """Queue a step; the future gets its StepResult (or DeadlineExceeded after `timeout` seconds)."""
        step = _Step(sequence_id, list(token_ids), start, end, logits)
        if end:  # its last step: no later one to wait for (idempotent: a free after a failed last step)
            self.open_sequences.discard(sequence_id)
        elif start:
            self.open_sequences.add(sequence_id)
        self.pending.append(step)
        if self.runner is None or self.runner.done():
            self.runner = asyncio.create_task(self._run(), name=f"steps {self.model}")
        if timeout is not None:
            timer = asyncio.get_running_loop().call_later(timeout, _expire, step.future, self.model)
            step.future.add_done_callback(lambda _: timer.cancel())
        return step.future

    async def _run(self) -> None:
        batch: list[_Step] = []
        try:
            while self.pending:
                for _ in range(2):  # let every sequence woken by the previous results queue its next step
                    if self._all_queued():
                        break
                    await asyncio.sleep(0)
                batch, self.pending = self.pending[:self.max_batch], self.pending[self.max_batch:]
                try:
                    results = await self.engine.infer_rows(self.model, batch, timeout=STEP_TIMEOUT_S)
                except LlmpError as error:
                    for step in batch:
                        if not step.future.done():
                            step.future.set_exception(error)
                    continue
                for step, result in zip(batch, results, strict=True):
                    if step.future.done():  # its caller gave up (deadline): nothing to deliver
                        continue
                    if result.next_token < 0 and step.token_ids:
                        step.future.set_exception(Internal(
                            f"Triton model {self.model} refused the step of sequence {step.sequence_id} "
                            "(state evicted or context exceeded)"))
                    else:
                        step.future.set_result(result)
                batch = []
        except asyncio.CancelledError:  # unloaded or shutting down: nobody waits forever
            for step in batch + self.pending:
                if not step.future.done():
                    step.future.set_exception(Unavailable(f"model {self.model} is being unloaded",
                                                          retry_after=RETRY_AFTER_S))
            self.pending = []
            raise

    def _all_queued(self) -> bool:
        """Whether every open sequence has a step queued (nothing would join the batch by waiting)."""
        if len(self.pending) < len(self.open_sequences):
            return False
        queued = {step.sequence_id for step in self.pending}
        return all(sequence_id in queued for sequence_id in self.open_sequences)

    def cancel(self) -> None:
        if self.runner is not None:
            self.runner.cancel()


def _expire(future: asyncio.Future, model: str) -> None:
    if not future.done():
        future.set_exception(DeadlineExceeded(f"infer {model}: deadline exceeded"))


class TritonEngine:
    """One async gRPC connection to Triton, and a step batcher per model."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.client = triton.InferenceServerClient(url)
        self.batchers: dict[str, StepBatcher] = {}

    async def close(self) -> None:
        for batcher in self.batchers.values():
            batcher.cancel()
        await self.client.close()

    async def check(self) -> None:
        """Readiness: Triton answers and says it is live."""
        try:
            live = await self.client.is_server_live(client_timeout=2)
        except InferenceServerException as error:
            raise Unavailable(f"Triton unreachable at {self.url}: {error.message()}",
                              retry_after=RETRY_AFTER_S) from None
        if not live:
            raise Unavailable(f"Triton at {self.url} is not live", retry_after=RETRY_AFTER_S)

    async def load(self, name: str) -> None:
        try:
            await self.client.load_model(name, client_timeout=LOAD_TIMEOUT_S)
        except InferenceServerException as error:
            raise _domain_error(error, f"load {name}") from None

    async def unload(self, name: str) -> None:
        batcher = self.batchers.pop(name, None)
        if batcher is not None:
            batcher.cancel()
        try:
            await self.client.unload_model(name, client_timeout=30)
        except InferenceServerException as error:
            raise _domain_error(error, f"unload {name}") from None

    async def is_ready(self, name: str) -> bool:
        try:
            return bool(await self.client.is_model_ready(name, client_timeout=5))
        except InferenceServerException:
            return False

    def submit(self, model: str, sequence_id: int, token_ids: list[int], *, start: bool = False,
               end: bool = False, logits: bool = False, timeout: float | None = None) -> asyncio.Future:
        """Queue `token_ids` for sequence `sequence_id` (batched with the other sequences' steps); the future
        gets the StepResult. Cancelling the future drops the result, not the step."""
        batcher = self.batchers.get(model)
        if batcher is None:
            batcher = self.batchers[model] = StepBatcher(self, model)
        return batcher.submit(sequence_id, token_ids, start=start, end=end, logits=logits, timeout=timeout)

    def open_sequences(self, model: str) -> int:
        """How many sequences are started and not ended on `model` (in this service)."""
        batcher = self.batchers.get(model)
        return 0 if batcher is None else len(batcher.open_sequences)

    async def step(self, model: str, sequence_id: int, token_ids: list[int], *, start: bool = False,
                   end: bool = False, logits: bool = False, timeout: float | None = None) -> StepResult:
        """`submit`, then wait for the result."""
        return await self.submit(model, sequence_id, token_ids, start=start, end=end, logits=logits,
                                 timeout=timeout)

    async def infer_rows(self, model: str, steps: list[_Step], *, timeout: float | None) -> list[StepResult]:
        """One Triton request with one row per step."""
        width = max(1, max(len(step.token_ids) for step in steps))
        ids = np.zeros((len(steps), width), np.int64)
        for row, step in enumerate(steps):
            ids[row, :len(step.token_ids)] = step.token_ids
        inputs = [
            _tensor("SEQUENCE_ID", np.array([[step.sequence_id] for step in steps], np.uint64), "UINT64"),
            _tensor("INPUT_IDS", ids, "INT64"),
            _tensor("INPUT_LENGTH", np.array([[len(step.token_ids)] for step in steps], np.int32), "INT32"),
            _tensor("START", np.array([[step.start] for step in steps], np.bool_), "BOOL"),
            _tensor("END", np.array([[step.end] for step in steps], np.bool_), "BOOL"),
        ]
        want_logits = any(step.logits for step in steps)
        outputs = [InferRequestedOutput("NEXT_TOKEN")] + ([InferRequestedOutput("LOGITS")] if want_logits else [])
        try:
            result = await self.client.infer(model, inputs, outputs=outputs, client_timeout=timeout)
        except InferenceServerException as error:
            raise _domain_error(error, f"infer {model}") from None
        except grpc.aio.AioRpcError as error:  # raised directly on some transport failures
            raise Unavailable(f"Triton unreachable: {error.details()}", retry_after=RETRY_AFTER_S) from None
        next_tokens = result.as_numpy("NEXT_TOKEN").reshape(-1)
        logits = result.as_numpy("LOGITS") if want_logits else None
        return [StepResult(int(next_tokens[row]), logits[row] if logits is not None and step.logits else None)
                for row, step in enumerate(steps)]

    async def embed(self, model: str, token_lists: list[list[int]], *, timeout: float | None) -> np.ndarray:
        """Embeddings [len(token_lists), hidden] from an encoder model (triton_model/encoder_model.py).

        Requests of at most MAX_BATCH rows (the model's max_batch_size), sent at once: Triton's dynamic
        batcher hands concurrent requests to one execute, which runs them as one ORT call."""
        chunks = [token_lists[start:start + MAX_BATCH] for start in range(0, len(token_lists), MAX_BATCH)]
        parts = await asyncio.gather(*(self._embed_rows(model, chunk, timeout=timeout) for chunk in chunks))
        return np.concatenate(parts, axis=0)

    async def _embed_rows(self, model: str, token_lists: list[list[int]], *, timeout: float | None) -> np.ndarray:
        width = max(len(tokens) for tokens in token_lists)
        ids = np.zeros((len(token_lists), width), np.int64)
        for row, tokens in enumerate(token_lists):
            ids[row, :len(tokens)] = tokens
        inputs = [_tensor("INPUT_IDS", ids, "INT64"),
                  _tensor("INPUT_LENGTH", np.array([[len(tokens)] for tokens in token_lists], np.int32), "INT32")]
        try:
            result = await self.client.infer(model, inputs, outputs=[InferRequestedOutput("EMBEDDING")],
                                             client_timeout=timeout)
        except InferenceServerException as error:
            raise _domain_error(error, f"infer {model}") from None
        except grpc.aio.AioRpcError as error:
            raise Unavailable(f"Triton unreachable: {error.details()}", retry_after=RETRY_AFTER_S) from None
        return result.as_numpy("EMBEDDING").reshape(len(token_lists), -1)


def _tensor(name: str, value: np.ndarray, datatype: str) -> InferInput:
    tensor = InferInput(name, list(value.shape), datatype)
    tensor.set_data_from_numpy(value)
    return tensor
