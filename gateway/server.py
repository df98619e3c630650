"""`python -m gateway.server`: serve the REST gateway until SIGTERM, then drain and stop."""

from __future__ import annotations

from aiohttp import web

from gateway.app import init_app
from services.common import logs
from services.common.config import Settings


def main() -> None:
    settings = Settings.from_env()
    logs.configure(settings, "gateway")
    web.run_app(init_app(settings), host=settings.bind_host, port=settings.gateway_port,
                shutdown_timeout=settings.shutdown_grace, access_log=None, print=None)


if __name__ == "__main__":
    main()
