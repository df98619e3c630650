"""llmp's gRPC services (dataset, training, registry, inference): `python -m services.<name>.server` on
LLMP_<NAME>_ADDR, healthy once the standard gRPC health check answers SERVING (each service's readiness)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from cli.stack.component import PythonProcess
from cli.stack.settings import host_port
from cli.stack.state import Record
from services.common import topology


@dataclass(frozen=True)
class Service(PythonProcess):
    @classmethod
    def of(cls, service: topology.GrpcService, requires: tuple[str, ...]) -> Service:
        return cls(service.name, requires, service.module)

    @property
    def address_setting(self) -> str:
        return topology.SERVICES_BY_NAME[self.name].addr_env

    def ports(self, env: Mapping[str, str]) -> list[int]:
        return [host_port(env[self.address_setting])[1]]

    def probe(self, record: Record, env: Mapping[str, str], timeout: float) -> bool:
        return grpc_healthy(env[self.address_setting], timeout)


def grpc_healthy(address: str, timeout: float = 2.0) -> bool:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""),
                                                              timeout=timeout)
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING
