"""The REST gateway: `python -m gateway.server` on LLMP_GATEWAY_PORT with the bootstrap admin key,
healthy once /readyz answers 200 (every backend it needs is ready)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from cli import servers
from cli.stack.component import Launch, PythonProcess
from cli.stack.settings import admin_key
from cli.stack.state import Record


@dataclass(frozen=True)
class Gateway(PythonProcess):
    def ports(self, env: Mapping[str, str]) -> list[int]:
        return [int(env["LLMP_GATEWAY_PORT"])]

    def command(self, launch: Launch) -> tuple[list[str], dict[str, str], str]:
        command, env, detail = super().command(launch)
        env["LLMP_ADMIN_KEY"] = admin_key(launch.env)
        return command, env, detail

    def probe(self, record: Record, env: Mapping[str, str], timeout: float) -> bool:
        return servers.http_ok(f"http://127.0.0.1:{env['LLMP_GATEWAY_PORT']}/readyz", timeout)
