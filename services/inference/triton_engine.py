"""The inference service's only way to Triton: `tritonclient`'s async gRPC client.

Loads and unloads models (explicit model control), reports readiness, and runs one decoding step of
one sequence (see triton_model/model.py for the step protocol). Triton failures become domain errors:
unreachable → Unavailable with retry_after; a model not ready → Unavailable; a deadline → DeadlineExceeded.
"""

from __future__ import annotations

import logging
import secrets

import grpc
import numpy as np
import tritonclient.grpc.aio as triton
from tritonclient.grpc import InferInput, InferRequestedOutput
from tritonclient.utils import InferenceServerException

from services.common.errors import BadRequest, DeadlineExceeded, Internal, Unavailable

log = logging.getLogger(__name__)

RETRY_AFTER_S = 2.0
LOAD_TIMEOUT_S = 300.0


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


class TritonEngine:
    """One async gRPC connection to Triton."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.client = triton.InferenceServerClient(url)

    async def close(self) -> None:
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
        try:
            await self.client.unload_model(name, client_timeout=30)
        except InferenceServerException as error:
            raise _domain_error(error, f"unload {name}") from None

    async def is_ready(self, name: str) -> bool:
        try:
            return bool(await self.client.is_model_ready(name, client_timeout=5))
        except InferenceServerException:
            return False

    async def step(self, model: str, sequence_id: int, token_ids: list[int], *, start: bool = False,
                   end: bool = False, timeout: float | None = None) -> np.ndarray:
        """Feed `token_ids` to sequence `sequence_id`; return the next-token logits [vocab] (empty if none ran)."""
        inputs = [
            _tensor("SEQUENCE_ID", np.array([[sequence_id]], np.uint64), "UINT64"),
            _tensor("INPUT_IDS", np.array([token_ids], np.int64).reshape(1, len(token_ids)), "INT64"),
            _tensor("START", np.array([[start]], np.bool_), "BOOL"),
            _tensor("END", np.array([[end]], np.bool_), "BOOL"),
        ]
        try:
            result = await self.client.infer(model, inputs, outputs=[InferRequestedOutput("LOGITS")],
                                             client_timeout=timeout)
        except InferenceServerException as error:
            raise _domain_error(error, f"infer {model}") from None
        except grpc.aio.AioRpcError as error:  # raised directly on some transport failures
            raise Unavailable(f"Triton unreachable: {error.details()}", retry_after=RETRY_AFTER_S) from None
        return result.as_numpy("LOGITS").reshape(-1)


def _tensor(name: str, value: np.ndarray, datatype: str) -> InferInput:
    tensor = InferInput(name, list(value.shape), datatype)
    tensor.set_data_from_numpy(value)
    return tensor
