"""Who a call acts for, and how that identity crosses gRPC, signed.

The gateway authenticates an API key into a `Caller`. Within a process, the caller of the work in hand is
a context variable, as the request id is (`logs.request_id`): the gateway sets it for each request, the
gRPC server for each incoming call, and `acting_as` for work a service does for a tenant on its own
(a training worker publishing a job's model). llmp's client channels (`grpc_client.CallPolicy`) put it
on every call through a `CallSigner`, so no call site passes it by hand; every service's server checks
it with a `CallVerifier` before any handler runs, and a handler reads the verified caller with
`caller_from_context`. Metadata a caller merely asserts (the `llmp-tenant`/`llmp-role` of old) counts for
nothing.

On the wire (docs/CONTRACTS.md, "Identity"), two signed tokens (`signing`):
- `llmp-caller`: signed by the gateway for one service (the audience), naming the tenant, key and role it
  authenticated; valid `CALLER_TTL` seconds.
- `llmp-service`: signed by a service (`service:<name>`) for the service it calls. Alone, the call acts
  for the tenant it names with the role `service`; beside an `llmp-caller` token the gateway issued to
  that same service, the call acts for that user (a token passed through, one hop: the inference
  service loading a version for the developer who created the deployment). Either way the callee
  grants a service principal only the methods `SERVICE_GRANTS` lists: the least each service needs.
"""

from __future__ import annotations

import contextvars
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from services.common import errors, logs
from services.common.signing import Claims, Signer

if TYPE_CHECKING:
    import grpc

    from services.common.config import Settings

REQUEST_ID_KEY = "x-request-id"
CALLER_TOKEN_KEY, SERVICE_TOKEN_KEY = "llmp-caller", "llmp-service"
GATEWAY = "gateway"
SERVICE_ROLE = "service"  # the role of a service acting for a tenant on its own
CALLER_TTL = 300.0  # seconds a gateway-signed caller token lasts: its request, and what that request starts
SERVICE_TTL = 60.0  # seconds a service's own token lasts: it is signed afresh for every call
FORWARD_MARGIN = 10.0  # a caller token this close to expiry is not passed on; the service acts as itself

# What each service principal may call, as "<service>/<Method>": the calls its code makes, nothing more.
# The gateway is not listed: it is the front door, where the role checks of each route are made.
SERVICE_GRANTS: Mapping[str, frozenset[str]] = {
    "service:inference": frozenset({
        "registry/GetModelVersion", "registry/ResolveAlias", "registry/CreateExport", "registry/GetExport",
        "registry/MarkDeployed", "registry/UnmarkDeployed",  # CreateExport: a deployment exports what it needs
        "registry/CheckAliasGate"}),  # a canary of a deployment whose stable is a gated alias asks its gate first
    # GetModelVersion: a dataset tokenized with a registered model's tokenizer reads its files' digests.
    "service:dataset": frozenset({"registry/ListModelVersionsByDataset", "registry/GetModelVersion"}),
    # A gated alias's move reads (and starts) the evaluations of the versions it compares.
    "service:registry": frozenset({"training/ListEvaluations", "training/SubmitEvaluation"}),
    "service:training": frozenset({
        "dataset/GetDatasetVersion", "registry/GetModelVersion", "registry/ReserveModelVersion",
        "registry/DownloadArtifact",  # a fine-tune's base: its config.json names the architecture
        "registry/RenewModelVersionReservation", "registry/CommitModelVersion"}),
}


def service_principal(service: str) -> str:
    """The principal a service signs its own calls as: `service:<name>`."""
    return f"service:{service}"


@dataclass(frozen=True)
class Caller:
    """Who a call acts for, as authenticated by the gateway (or a service acting for a tenant itself)."""

    tenant: str
    key_id: str
    role: str
    via: str = ""  # the service principal the call came through; "" when straight from the gateway
    # The gateway-signed token this caller was verified from, when this process may pass it on.
    token: str = field(default="", compare=False, repr=False)


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


def acting_for(tenant: str) -> Caller:
    """Who a service's call for `tenant` should act as: the current caller when it is that tenant's (its
    token is passed on), else the service itself for the tenant (`SERVICE_ROLE`, its grants only)."""
    caller = current.get()
    if caller is not None and caller.tenant == tenant:
        return caller
    return Caller(tenant=tenant, key_id="", role=SERVICE_ROLE)


def audience_of(method: str | bytes) -> str:
    """The llmp service a full method name belongs to: `/llmp.registry.v1.RegistryService/X` -> registry."""
    text = method.decode() if isinstance(method, bytes) else method
    package = text.lstrip("/").partition("/")[0]
    parts = package.split(".")
    return parts[1] if len(parts) > 2 and parts[0] == "llmp" else package


def _short_method(method: str) -> str:
    return f"{audience_of(method)}/{method.rpartition('/')[2]}"


class CallSigner:
    """The identity metadata a process puts on its outgoing calls, as `principal` (GATEWAY or a service's)."""

    def __init__(self, signer: Signer, principal: str) -> None:
        self.signer, self.principal = signer, principal

    def metadata(self, audience: str, *, now: float | None = None) -> tuple[tuple[str, str], ...]:
        """The request id, and the current caller signed for `audience` (nothing when there is none)."""
        request_id = ((REQUEST_ID_KEY, logs.request_id.get()),)
        caller = current.get()
        if caller is None:
            return request_id
        now = time.time() if now is None else now
        if self.principal == GATEWAY:
            claims = Claims(GATEWAY, audience, caller.tenant, caller.key_id, caller.role, now + CALLER_TTL)
            return request_id + ((CALLER_TOKEN_KEY, self.signer.sign(claims)),)
        own = self.signer.sign(Claims(self.principal, audience, caller.tenant, caller.key_id, SERVICE_ROLE,
                                      now + SERVICE_TTL))
        metadata = request_id + ((SERVICE_TOKEN_KEY, own),)
        if caller.token and _forwardable(self.signer, caller.token, now):
            metadata += ((CALLER_TOKEN_KEY, caller.token),)
        return metadata


def _forwardable(signer: Signer, token: str, now: float) -> bool:
    try:
        signer.verify(token, now=now + FORWARD_MARGIN)
    except errors.Unauthenticated:
        return False
    return True


class CallVerifier:
    """Who an incoming call of `service` acts for, from its signed metadata; refuses anything else."""

    def __init__(self, signer: Signer, service: str) -> None:
        self.signer, self.service = signer, service
        self.principal = service_principal(service)

    def caller(self, metadata: Iterable[tuple[str, str | bytes]] | None, method: str) -> Caller:
        """The verified caller of a call to `method`; Unauthenticated when its identity is missing,
        forged, expired or meant for another service; PermissionDenied when a service principal calls a
        method it is not granted."""
        values = {key: value for key, value in metadata or () if isinstance(value, str)}
        caller_token, service_token = values.get(CALLER_TOKEN_KEY), values.get(SERVICE_TOKEN_KEY)
        if service_token is None:
            if caller_token is None:
                raise errors.Unauthenticated(f"call carries no signed identity ({CALLER_TOKEN_KEY} metadata)")
            claims = self._claims(caller_token, issuer=GATEWAY)
            return Caller(claims.tenant, claims.key_id, claims.role, token=caller_token)
        service = self._claims(service_token)
        if not service.issuer.startswith("service:"):
            raise errors.Unauthenticated("invalid identity token")
        if _short_method(method) not in SERVICE_GRANTS.get(service.issuer, ()):
            raise errors.PermissionDenied(f"{service.issuer} may not call {_short_method(method)}")
        if caller_token is None:
            return Caller(service.tenant, service.key_id, SERVICE_ROLE, via=service.issuer)
        # A user's token passed on: the gateway must have issued it to the service passing it, for this tenant.
        user = self._claims(caller_token, issuer=GATEWAY, audience=service.issuer.removeprefix("service:"))
        if user.tenant != service.tenant:
            raise errors.Unauthenticated("invalid identity token")
        return Caller(user.tenant, user.key_id, user.role, via=service.issuer)

    def _claims(self, token: str, *, issuer: str | None = None, audience: str | None = None) -> Claims:
        claims = self.signer.verify(token)
        if (issuer is not None and claims.issuer != issuer) or claims.audience != (audience or self.service) \
                or not claims.tenant:
            raise errors.Unauthenticated("invalid identity token")
        return claims


def caller_from_context(context: grpc.aio.ServicerContext) -> Caller:
    """The caller the server verified for this call (`CallVerifier`, run by `grpc_server` before any handler)."""
    caller = current.get()
    if caller is None:
        raise errors.Unauthenticated(f"call carries no signed identity ({CALLER_TOKEN_KEY} metadata)")
    return caller


def signer_for(settings: Settings) -> Signer:
    """The signer every process of a deployment shares (`config.Settings.service_secret`)."""
    return Signer(settings.service_secret())


def signed_metadata(signer: Signer, caller: Caller, service: str) -> tuple[tuple[str, str], ...]:
    """The metadata the gateway would put on a call of `caller` to `service` (for tools and tests that
    call a service's stub directly)."""
    with acting_as(caller):
        return CallSigner(signer, GATEWAY).metadata(service)
