"""Who a call acts for, and how that identity crosses gRPC.

The gateway authenticates an API key into a `Caller`; services receive it in the call's metadata
(`llmp-tenant`, `llmp-key-id`, `llmp-role`, beside the request id `x-request-id`) and read it with
`caller_from_context`. Within a process, the caller of the work in hand is a context variable, as the
request id is (`logs.request_id`): the gateway sets it for each request, the gRPC server for each
incoming call, and `acting_as` for work a service does as a given identity (the inference service
asking the registry about a tenant's model). llmp's client channels (`grpc_client`) send it on every
call, so no call site passes it by hand.
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

from services.common import errors, logs

if TYPE_CHECKING:
    import grpc

REQUEST_ID_KEY = "x-request-id"
TENANT_KEY, KEY_ID_KEY, ROLE_KEY = "llmp-tenant", "llmp-key-id", "llmp-role"


@dataclass(frozen=True)
class Caller:
    """Who a call acts for, as authenticated by the gateway."""

    tenant: str
    key_id: str
    role: str


# The caller the current request, call or task acts for; None outside any (a probe, a startup task).
current: contextvars.ContextVar[Caller | None] = contextvars.ContextVar("caller", default=None)


@contextmanager
def acting_as(caller: Caller | None) -> Iterator[Caller | None]:
    """Make `caller` the current caller inside the block (the calls made there carry it)."""
    token = current.set(caller)
    try:
        yield caller
    finally:
        current.reset(token)


def caller_metadata(caller: Caller) -> tuple[tuple[str, str], ...]:
    """The metadata that names `caller` on a call."""
    return (TENANT_KEY, caller.tenant), (KEY_ID_KEY, caller.key_id), (ROLE_KEY, caller.role)


def call_metadata() -> tuple[tuple[str, str], ...]:
    """What a call made now carries: the request id, and the current caller when there is one."""
    caller = current.get()
    request_id = ((REQUEST_ID_KEY, logs.request_id.get()),)
    return request_id if caller is None else request_id + caller_metadata(caller)


def caller_from_metadata(metadata: Iterable[tuple[str, str]] | None) -> Caller | None:
    """The caller named in a call's metadata, None when it names no tenant."""
    values = dict(metadata or ())
    tenant = values.get(TENANT_KEY, "")
    if not tenant:
        return None
    return Caller(tenant=tenant, key_id=values.get(KEY_ID_KEY, ""), role=values.get(ROLE_KEY, ""))


def caller_from_context(context: grpc.aio.ServicerContext) -> Caller:
    """The caller a gateway (or trusted peer) put in the call's metadata; no tenant is an error."""
    caller = caller_from_metadata(context.invocation_metadata())
    if caller is None:
        raise errors.Unauthenticated("call carries no tenant (llmp-tenant metadata)")
    return caller
