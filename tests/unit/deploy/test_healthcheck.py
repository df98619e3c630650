"""`python -m services.common.healthcheck`, the command every image's HEALTHCHECK runs, against real servers."""

from __future__ import annotations

import http.server
import subprocess
import sys
import threading
from concurrent import futures

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from cli.servers import free_port
from services.common import healthcheck

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture
def grpc_health_server():
    """A real gRPC server with the standard health service; yields (addr, its HealthServicer)."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}", servicer
    server.stop(grace=None)


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's naming)
        self.send_response(200 if self.path == "/healthz" else 503)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def http_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_serving_server_is_healthy(grpc_health_server):
    addr, servicer = grpc_health_server
    servicer.set("", SERVING)
    assert healthcheck.main([addr]) == 0


def test_not_serving_server_is_unhealthy_and_says_why(grpc_health_server, capsys):
    addr, servicer = grpc_health_server
    servicer.set("", NOT_SERVING)
    assert healthcheck.main([addr]) == 1
    assert "NOT_SERVING" in capsys.readouterr().err


def test_a_named_service_is_asked_about(grpc_health_server):
    addr, servicer = grpc_health_server
    servicer.set("", SERVING)
    servicer.set("llmp.dataset.v1.DatasetService", NOT_SERVING)
    assert healthcheck.main([addr, "--service", "llmp.dataset.v1.DatasetService"]) == 1
    assert healthcheck.main([addr, "--service", "llmp.unknown.v1.Nothing"]) == 1  # NOT_FOUND
    servicer.set("llmp.dataset.v1.DatasetService", SERVING)
    assert healthcheck.main([addr, "--service", "llmp.dataset.v1.DatasetService"]) == 0


def test_nothing_listening_is_unhealthy_within_the_timeout(capsys):
    assert healthcheck.main([f"127.0.0.1:{free_port()}", "--timeout", "1"]) == 1
    err = capsys.readouterr().err
    assert "UNAVAILABLE" in err or "DEADLINE_EXCEEDED" in err


def test_http_urls_are_fetched(http_server):
    assert healthcheck.main([f"{http_server}/healthz"]) == 0
    assert healthcheck.main([f"{http_server}/readyz"]) == 1
    assert healthcheck.main([f"http://127.0.0.1:{free_port()}/healthz", "--timeout", "1"]) == 1


def test_runs_as_a_module_with_its_exit_status(grpc_health_server):
    """The exact command the Dockerfiles' HEALTHCHECK and docker-compose.yml run."""
    addr, servicer = grpc_health_server
    command = [sys.executable, "-m", "services.common.healthcheck", addr]
    servicer.set("", SERVING)
    assert subprocess.run(command, capture_output=True, timeout=60).returncode == 0
    servicer.set("", NOT_SERVING)
    failed = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert failed.returncode == 1 and "NOT_SERVING" in failed.stderr
