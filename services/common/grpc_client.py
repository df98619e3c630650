"""Calling llmp's gRPC services: one channel per service, caller and request id passed along,
peer errors turned back into the domain errors they started as."""

from __future__ import annotations

import importlib
import json
from collections.abc import AsyncIterator
from typing import Any

import grpc

from services.common import errors, logs
from services.common.config import Settings
from services.common.grpc_server import (
    ACCEPTING_HEALTH_NAME,
    KEY_ID_KEY,
    REQUEST_ID_KEY,
    ROLE_KEY,
    TENANT_KEY,
    Caller,
)
from services.common.topology import GRPC_SERVICES

# Service name -> (generated grpc module, stub class)
_STUBS = {
    "dataset": ("llmp.dataset.v1.dataset_pb2_grpc", "DatasetServiceStub"),
    "training": ("llmp.training.v1.training_pb2_grpc", "TrainingServiceStub"),
    "registry": ("llmp.registry.v1.registry_pb2_grpc", "RegistryServiceStub"),
    "inference": ("llmp.inference.v1.inference_pb2_grpc", "InferenceServiceStub"),
}
# Where an address names several replicas (`ipv4:a:1,b:2`, or a DNS name with several records),
# round_robin spreads the calls and client-side health checking (grpc.health.v1 Watch on
# ACCEPTING_HEALTH_NAME) drops a replica the moment it starts draining. grpc retries a call that got
# ABORTED, on every method: only a draining server's gate answers it (`grpc_server.ShutdownGate`; no domain
# error maps to it) and the call never ran, so another attempt on another replica is safe (grpc retries
# only before the first response arrives and while the request fits its 256 KiB replay buffer).
# UNAVAILABLE is not retried: a service answers it when its PostgreSQL or S3 is down, possibly after it
# changed something, and repeating would only stretch the caller's wait past its deadline.
SERVICE_CONFIG = {
    "loadBalancingConfig": [{"round_robin": {}}],
    "healthCheckConfig": {"serviceName": ACCEPTING_HEALTH_NAME},
    "methodConfig": [{
        "name": [{}],  # every method of every service
        "retryPolicy": {"maxAttempts": 4, "initialBackoff": "0.1s", "maxBackoff": "1s", "backoffMultiplier": 2,
                        "retryableStatusCodes": ["ABORTED"]},
    }],
}
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.enable_retries", 1),
    ("grpc.service_config", json.dumps(SERVICE_CONFIG)),
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


def call_metadata(caller: Caller | None) -> tuple[tuple[str, str], ...]:
    metadata = [(REQUEST_ID_KEY, logs.request_id.get())]
    if caller is not None:
        metadata += [(TENANT_KEY, caller.tenant), (KEY_ID_KEY, caller.key_id), (ROLE_KEY, caller.role)]
    return tuple(metadata)


def domain_error(error: grpc.aio.AioRpcError) -> errors.LlmpError:
    """The domain error a peer raised (or Unavailable when the peer could not be reached)."""
    return errors.from_grpc(error.code(), error.details(), error.trailing_metadata())


class ServiceClients:
    """Lazily created async channels and stubs for every llmp service."""

    def __init__(self, settings: Settings) -> None:
        self.addresses = dict(settings.service_addrs)
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._stubs: dict[str, Any] = {}

    def channel(self, service: str) -> grpc.aio.Channel:
        if service not in self._channels:
            self._channels[service] = grpc.aio.insecure_channel(self.addresses[service], options=CHANNEL_OPTIONS)
        return self._channels[service]

    def stub(self, service: str) -> Any:
        if service not in self._stubs:
            module_name, stub_name = _STUBS[service]
            module = importlib.import_module(module_name)
            self._stubs[service] = getattr(module, stub_name)(self.channel(service))
        return self._stubs[service]

    async def call(self, service: str, method: str, request: Any, *, caller: Caller | None = None,
                   timeout: float | None = DEFAULT_TIMEOUT, metadata: tuple[tuple[str, str], ...] = ()) -> Any:
        """Unary call `service.method(request)`; peer errors raise as domain errors."""
        rpc = getattr(self.stub(service), method)
        try:
            return await rpc(request, metadata=call_metadata(caller) + metadata, timeout=timeout)
        except grpc.aio.AioRpcError as error:
            raise domain_error(error) from None

    async def stream(self, service: str, method: str, request: Any, *, caller: Caller | None = None,
                     timeout: float | None = None, metadata: tuple[tuple[str, str], ...] = ()) -> AsyncIterator[Any]:
        """Server-streaming call; yields responses; peer errors raise as domain errors."""
        rpc = getattr(self.stub(service), method)
        call = rpc(request, metadata=call_metadata(caller) + metadata, timeout=timeout)
        try:
            async for response in call:
                yield response
        except grpc.aio.AioRpcError as error:
            raise domain_error(error) from None
        finally:
            call.cancel()

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()
        self._stubs.clear()


async def health_check(address: str, service: str = "", timeout: float = 2.0) -> str:
    """The grpc.health.v1 status name of `service` at `address` ('UNREACHABLE' when it can't be asked)."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    async with grpc.aio.insecure_channel(address) as channel:
        try:
            response = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.aio.AioRpcError as error:
            return "UNREACHABLE" if error.code() == grpc.StatusCode.UNAVAILABLE else error.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


KNOWN_SERVICES = tuple(service.name for service in GRPC_SERVICES)
