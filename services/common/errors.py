"""The domain-error hierarchy and its one mapping to gRPC status codes and HTTP statuses.

Domain code raises these; the gRPC exception interceptor turns them into status codes and the
gateway turns status codes back into HTTP responses, both through `MAPPING`, so an error means the
same thing everywhere. The error's `type` travels in the gRPC trailing metadata so the gateway can
answer with the precise HTTP status (e.g. 412 vs 428, both FAILED_PRECONDITION on the wire).
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc


class LlmpError(Exception):
    """Base of every error llmp reports to a caller. `type` is the stable name clients see."""

    type = "internal"

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after


class InvalidArgument(LlmpError):
    """Malformed input: wrong type, unparsable, bad encoding."""

    type = "invalid_argument"


class ValidationFailed(LlmpError):
    """Well-formed input that breaks a rule (a value out of range, a missing field)."""

    type = "validation_failed"


class BadRequest(LlmpError):
    """A request that cannot be served as asked (e.g. a prompt longer than the model's context)."""

    type = "bad_request"


class Unauthenticated(LlmpError):
    type = "unauthenticated"


class PermissionDenied(LlmpError):
    type = "permission_denied"


class NotFound(LlmpError):
    type = "not_found"


class AlreadyExists(LlmpError):
    type = "already_exists"


class Conflict(LlmpError):
    """The resource's state forbids the change (e.g. deleting a dataset a model's lineage uses)."""

    type = "conflict"


class PreconditionFailed(LlmpError):
    """An `If-Match` / `If-None-Match` precondition did not hold."""

    type = "precondition_failed"


class PreconditionRequired(LlmpError):
    """A conditional request was required and none was sent."""

    type = "precondition_required"


class PayloadTooLarge(LlmpError):
    type = "payload_too_large"


class UnsupportedMediaType(LlmpError):
    """A request body in a media type the operation does not read (e.g. text/plain where JSON is expected)."""

    type = "unsupported_media_type"


class RateLimited(LlmpError):
    type = "rate_limited"


class Unavailable(LlmpError):
    """A backend (PostgreSQL, S3, Triton, a service) cannot be reached now; retry later."""

    type = "unavailable"


class DeadlineExceeded(LlmpError):
    type = "deadline_exceeded"


class Cancelled(LlmpError):
    type = "cancelled"


class Internal(LlmpError):
    type = "internal"


@dataclass(frozen=True)
class Mapping:
    grpc_code: grpc.StatusCode
    http_status: int


MAPPING: dict[type[LlmpError], Mapping] = {
    InvalidArgument: Mapping(grpc.StatusCode.INVALID_ARGUMENT, 400),
    ValidationFailed: Mapping(grpc.StatusCode.INVALID_ARGUMENT, 422),
    BadRequest: Mapping(grpc.StatusCode.OUT_OF_RANGE, 400),
    Unauthenticated: Mapping(grpc.StatusCode.UNAUTHENTICATED, 401),
    PermissionDenied: Mapping(grpc.StatusCode.PERMISSION_DENIED, 403),
    NotFound: Mapping(grpc.StatusCode.NOT_FOUND, 404),
    AlreadyExists: Mapping(grpc.StatusCode.ALREADY_EXISTS, 409),
    Conflict: Mapping(grpc.StatusCode.FAILED_PRECONDITION, 409),
    PreconditionFailed: Mapping(grpc.StatusCode.FAILED_PRECONDITION, 412),
    PreconditionRequired: Mapping(grpc.StatusCode.FAILED_PRECONDITION, 428),
    PayloadTooLarge: Mapping(grpc.StatusCode.RESOURCE_EXHAUSTED, 413),
    UnsupportedMediaType: Mapping(grpc.StatusCode.INVALID_ARGUMENT, 415),
    RateLimited: Mapping(grpc.StatusCode.RESOURCE_EXHAUSTED, 429),
    Unavailable: Mapping(grpc.StatusCode.UNAVAILABLE, 503),
    DeadlineExceeded: Mapping(grpc.StatusCode.DEADLINE_EXCEEDED, 504),
    Cancelled: Mapping(grpc.StatusCode.CANCELLED, 499),
    Internal: Mapping(grpc.StatusCode.INTERNAL, 500),
}
ERRORS_BY_TYPE: dict[str, type[LlmpError]] = {cls.type: cls for cls in MAPPING}
# When a peer's status carries no llmp type (a raw gRPC failure), the code alone decides.
ERROR_FOR_CODE: dict[grpc.StatusCode, type[LlmpError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.OUT_OF_RANGE: BadRequest,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.FAILED_PRECONDITION: Conflict,
    grpc.StatusCode.ABORTED: Unavailable,  # a draining server's refusal (grpc_server.ShutdownGate)
    grpc.StatusCode.RESOURCE_EXHAUSTED: RateLimited,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.CANCELLED: Cancelled,
}

# Trailing-metadata keys that carry the llmp error across gRPC.
ERROR_TYPE_KEY = "llmp-error-type"
RETRY_AFTER_KEY = "llmp-retry-after"


def mapping_for(error: LlmpError) -> Mapping:
    for cls in type(error).__mro__:
        if cls in MAPPING:
            return MAPPING[cls]  # type: ignore[index]
    return MAPPING[Internal]


def to_grpc_metadata(error: LlmpError) -> tuple[tuple[str, str], ...]:
    metadata = [(ERROR_TYPE_KEY, error.type)]
    if error.retry_after is not None:
        metadata.append((RETRY_AFTER_KEY, f"{error.retry_after:g}"))
    return tuple(metadata)


def from_grpc(code: grpc.StatusCode, details: str | None, metadata) -> LlmpError:
    """Rebuild the domain error a peer raised from its status code, details and trailing metadata."""
    values = dict(metadata or ())
    cls = ERRORS_BY_TYPE.get(values.get(ERROR_TYPE_KEY, "")) or ERROR_FOR_CODE.get(code, Internal)
    retry_after = values.get(RETRY_AFTER_KEY)
    if retry_after is None and cls is Unavailable:
        retry_after = "1"
    message = details or code.name.lower()
    return cls(message, retry_after=float(retry_after) if retry_after is not None else None)


def from_exception(error: BaseException) -> LlmpError | None:
    """The domain error a library exception that escaped a handler stands for, or None when it is a bug.

    PostgreSQL unreachable or gone mid-query (psycopg `OperationalError`, the pool's `PoolTimeout`) is
    503 Unavailable, not a 500: the caller should retry. A value PostgreSQL refuses to store or compare
    (`DataError`: NUL bytes in text, a number out of range) comes from the request, so it is
    InvalidArgument. Both server sides (the gRPC interceptor, the gateway's error middleware) use it.
    """
    import psycopg  # every llmp process has it; imported here so errors.py stays light for the CLI
    from psycopg_pool import PoolTimeout

    if isinstance(error, (psycopg.OperationalError, PoolTimeout)):
        return Unavailable(f"PostgreSQL unavailable: {str(error).strip() or type(error).__name__}", retry_after=2)
    if isinstance(error, psycopg.DataError):
        return InvalidArgument(f"invalid value: {str(error).strip().splitlines()[0]}")
    return None


def http_body(error: LlmpError) -> dict:
    """The one error body of the REST API."""
    return {"error": {"type": error.type, "message": error.message}}
