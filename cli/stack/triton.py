"""NVIDIA Triton: the `tritonserver` bundled in the nvidia-pytriton wheel, serving the model repository
LLMP_TRITON_MODEL_REPOSITORY (by default <state>/triton-models) in explicit model-control mode."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from cli import servers
from cli.stack.component import Component, Launch, Started
from cli.stack.settings import child_env, host_port
from cli.stack.state import Record


@dataclass(frozen=True)
class Triton(Component):
    def ports(self, env: Mapping[str, str]) -> list[int]:
        return [host_port(env["LLMP_TRITON_HTTP_URL"])[1], host_port(env["LLMP_TRITON_GRPC_URL"])[1],
                int(env["LLMP_TRITON_METRICS_PORT"])]

    def start(self, launch: Launch) -> Started:
        launch.require_free(self)
        env = launch.env
        http, grpc, metrics = self.ports(env)
        repository = env["LLMP_TRITON_MODEL_REPOSITORY"]
        if repository == str(launch.dirs.root / "triton-models"):  # the default; one the user names must exist
            Path(repository).mkdir(parents=True, exist_ok=True)
        backends = servers.triton_backends(launch.dirs.root / "triton-backends")
        command = servers.triton_command(repository, servers.TritonPorts(http=http, grpc=grpc, metrics=metrics),
                                         backends, env["LLMP_BIND_HOST"])
        process, record = launch.popen(self, command, servers.triton_env(child_env(env)), detail=f"http {http}")
        launch.wait(self, record, process)
        return record, {}

    def probe(self, record: Record, env: Mapping[str, str], timeout: float) -> bool:
        host, port = host_port(env["LLMP_TRITON_HTTP_URL"])
        return servers.triton_ready(port, host, timeout)
