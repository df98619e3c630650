"""Calling llmp's gRPC services through their generated, typed stubs: `clients.registry.GetModelVersion(
request)`. Each service has one channel, and every channel one client interceptor policy (`CallPolicy`) that
sends the current caller, signed for the service called, and the request id (`identity.CallSigner`), gives a
unary call the default deadline when it names none, and turns a peer's error back into the domain error it
started as."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import grpc
from llmp.dataset.v1 import dataset_pb2_grpc
from llmp.inference.v1 import inference_pb2_grpc
from llmp.registry.v1 import registry_pb2_grpc
from llmp.training.v1 import training_pb2_grpc

from services.common import errors, identity, tracing
from services.common.config import GrpcTls, Settings
from services.common.grpc_server import ACCEPTING_HEALTH_NAME

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

# How a channel spreads calls over a service's replicas (Settings.grpc_balancing):
# - `client`: the address names the replicas themselves (`ipv4:a:1,b:2`, or a DNS name with several
#   records: compose's service name, a Kubernetes headless Service). round_robin spreads the calls and
#   client-side health checking (grpc.health.v1 Watch on ACCEPTING_HEALTH_NAME) drops a replica the moment
#   it starts draining.
# - `mesh`: the address is a ClusterIP and the channel's one connection goes to the local Envoy, which
#   balances each call over the replicas and stops sending to a draining one itself. No client health
#   check there: it would watch whichever single replica Envoy sent the Watch to, and when that one
#   drained the channel would call its only subchannel unhealthy and fail every call.
# Both: grpc retries a call that got ABORTED, on every method: only a draining server's gate answers it
# (`grpc_server.ShutdownGate`; no domain error maps to it) and the call never ran, so another attempt on
# another replica is safe (grpc retries only before the first response arrives and while the request fits
# its 256 KiB replay buffer). UNAVAILABLE is not retried: a service answers it when its PostgreSQL or S3 is
# down, possibly after it changed something, and repeating would only stretch the caller's wait past its
# deadline.
RETRY_METHOD_CONFIG = [{
    "name": [{}],  # every method of every service
    "retryPolicy": {"maxAttempts": 4, "initialBackoff": "0.1s", "maxBackoff": "1s", "backoffMultiplier": 2,
                    "retryableStatusCodes": ["ABORTED"]},
}]
SERVICE_CONFIGS = {
    "client": {"loadBalancingConfig": [{"round_robin": {}}],
               "healthCheckConfig": {"serviceName": ACCEPTING_HEALTH_NAME},
               "methodConfig": RETRY_METHOD_CONFIG},
    "mesh": {"loadBalancingConfig": [{"pick_first": {}}], "methodConfig": RETRY_METHOD_CONFIG},
}
SERVICE_CONFIG = SERVICE_CONFIGS["client"]  # the local stack's and compose's


def channel_options(balancing: str = "client") -> list[tuple[str, object]]:
    """The options of every channel to an llmp service, balancing as `balancing` (SERVICE_CONFIGS) says."""
    return [
        ("grpc.max_receive_message_length", 64 * 1024 * 1024),
        ("grpc.max_send_message_length", 64 * 1024 * 1024),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.enable_retries", 1),
        ("grpc.service_config", json.dumps(SERVICE_CONFIGS[balancing])),
        # Each channel owns its connections: with grpc's process-wide pool a new channel inherits a shared
        # subchannel's reconnect backoff (an old channel's failures) and fails its first calls at once.
        ("grpc.use_local_subchannel_pool", 1),
    ]

DEFAULT_TIMEOUT = 30.0
# On inference calls for one deployment: which deployment, for the mesh. On Kubernetes the `inference`
# VirtualService routes a deployment's calls by this header to its stable/canary split (inference/mesh.py).
DEPLOYMENT_KEY = "x-llmp-deployment"


def deployment_metadata(tenant: str, deployment: str) -> tuple[tuple[str, str], ...]:
    """The metadata naming a tenant's deployment: `<tenant>/<deployment>` (neither name may hold a '/')."""
    return ((DEPLOYMENT_KEY, f"{tenant}/{deployment}"),)


def domain_error(error: grpc.aio.AioRpcError) -> errors.LlmpError:
    """The domain error a peer raised (or Unavailable when the peer could not be reached)."""
    return errors.from_grpc(error.code(), error.details(), error.trailing_metadata())


class CallPolicy:
    """What every call to an llmp service needs, in one place: the current caller (signed by `signer` for the
    service the method belongs to) and request id in its metadata (a key the call sets itself is left as it
    set it), `default_timeout` on a unary call that names no deadline (a stream or an upload runs as long
    as its caller wants), and a peer's error
    raised as the domain error (`errors.from_grpc`), so callers and the gateway's error middleware only
    ever see `errors.LlmpError`. grpc.aio runs interceptors in a task created when the stub is called,
    which copies the caller's context: the caller is the one current where the call is made.

    One policy, one interceptor per kind of call (`interceptors()`): a grpc.aio channel files an
    interceptor under the first kind it implements only."""

    def __init__(self, signer: identity.CallSigner, default_timeout: float = DEFAULT_TIMEOUT) -> None:
        self.signer = signer
        self.default_timeout = default_timeout

    def details(self, details: grpc.aio.ClientCallDetails, *, unary: bool) -> grpc.aio.ClientCallDetails:
        given = details.metadata or ()
        named = {key for key, _ in given}
        identified = self.signer.metadata(identity.audience_of(details.method))
        metadata = grpc.aio.Metadata(*(item for item in identified if item[0] not in named), *given)
        timeout = self.default_timeout if unary and details.timeout is None else details.timeout
        return grpc.aio.ClientCallDetails(details.method, timeout, metadata, details.credentials,
                                          details.wait_for_ready)

    def interceptors(self) -> list[grpc.aio.ClientInterceptor]:
        return [_Unary(self), _ServerStreaming(self), _ClientStreaming(self)]


class _Unary(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self, policy: CallPolicy) -> None:
        self.policy = policy

    async def intercept_unary_unary(self, continuation, client_call_details, request):
        call = await continuation(self.policy.details(client_call_details, unary=True), request)
        try:
            return await call
        except grpc.aio.AioRpcError as error:
            raise domain_error(error) from None


class _ClientStreaming(grpc.aio.StreamUnaryClientInterceptor):
    def __init__(self, policy: CallPolicy) -> None:
        self.policy = policy

    async def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        call = await continuation(self.policy.details(client_call_details, unary=False), request_iterator)
        try:
            code = await call.code()  # the end of the call, without raising (this kind must return a call)
        except asyncio.CancelledError:  # the caller gave up: so does the upload
            call.cancel()
            raise
        if code != grpc.StatusCode.OK:
            raise errors.from_grpc(code, await call.details(), await call.trailing_metadata())
        return call


class _ServerStreaming(grpc.aio.UnaryStreamClientInterceptor):
    def __init__(self, policy: CallPolicy) -> None:
        self.policy = policy

    async def intercept_unary_stream(self, continuation, client_call_details, request):
        call = await continuation(self.policy.details(client_call_details, unary=False), request)
        return _domain_errors(call)


async def _domain_errors(call) -> AsyncIterator[Any]:
    try:
        async for response in call:
            yield response
    except grpc.aio.AioRpcError as error:
        raise domain_error(error) from None


class ServiceClients:
    """One channel per llmp service, opened on first use, and its typed stub, calling as `principal`:
    `identity.GATEWAY`, or a service's own `identity.service_principal(name)`. The channels carry
    `CallPolicy`'s interceptors outermost, then the tracing interceptors (client spans, the trace context in the
    metadata) when tracing is on, so a span records the call's own status before errors are mapped."""

    def __init__(self, settings: Settings, *, principal: str, tracer_provider: TracerProvider | None = None,
                 default_timeout: float = DEFAULT_TIMEOUT) -> None:
        self.addresses = dict(settings.service_addrs)
        self.options = channel_options(settings.grpc_balancing)
        self.tls = settings.grpc_tls
        signer = identity.CallSigner(identity.signer_for(settings), principal)
        self.interceptors = [*CallPolicy(signer, default_timeout).interceptors(),
                             *tracing.client_interceptors(tracer_provider or tracing.process_provider())]
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._stubs: dict[str, Any] = {}

    def channel(self, service: str) -> grpc.aio.Channel:
        if service not in self._channels:
            self._channels[service] = open_channel(self.addresses[service], self.tls, options=self.options,
                                                   interceptors=self.interceptors)
        return self._channels[service]

    def _stub(self, service: str, stub_class: type) -> Any:
        stub = self._stubs.get(service)
        if stub is None:
            stub = self._stubs[service] = stub_class(self.channel(service))
        return stub

    @property
    def dataset(self) -> dataset_pb2_grpc.DatasetServiceStub:
        return self._stub("dataset", dataset_pb2_grpc.DatasetServiceStub)

    @property
    def training(self) -> training_pb2_grpc.TrainingServiceStub:
        return self._stub("training", training_pb2_grpc.TrainingServiceStub)

    @property
    def registry(self) -> registry_pb2_grpc.RegistryServiceStub:
        return self._stub("registry", registry_pb2_grpc.RegistryServiceStub)

    @property
    def inference(self) -> inference_pb2_grpc.InferenceServiceStub:
        return self._stub("inference", inference_pb2_grpc.InferenceServiceStub)

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()
        self._stubs.clear()


def credentials(tls: GrpcTls) -> grpc.ChannelCredentials:
    """This process's certificate (servers under mTLS require one) and the CA that must sign the server's."""
    cert, key, ca = tls.read()
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)


def open_channel(address: str, tls: GrpcTls | None, **kwargs: Any) -> grpc.aio.Channel:
    """An aio channel to `address`: mutual TLS when `tls` is set (LLMP_GRPC_TLS_*), else plaintext."""
    if tls is None:
        return grpc.aio.insecure_channel(address, **kwargs)
    return grpc.aio.secure_channel(address, credentials(tls), **kwargs)


async def health_check(address: str, service: str = "", timeout: float = 2.0, tls: GrpcTls | None = None) -> str:
    """The grpc.health.v1 status name of `service` at `address` ('UNREACHABLE' when it can't be asked)."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    async with open_channel(address, tls) as channel:
        try:
            response = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.aio.AioRpcError as error:
            return "UNREACHABLE" if error.code() == grpc.StatusCode.UNAVAILABLE else error.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
