"""Container healthcheck: `python -m services.common.healthcheck ADDR [--service NAME]`.

Asks a gRPC server `grpc.health.v1.Health/Check` and exits 0 when it answers SERVING, 1 otherwise
(NOT_SERVING, unknown service, unreachable, timeout). An `http://…` ADDR is fetched instead and
counts as healthy on a 2xx answer (the REST gateway's `/healthz`, Triton's `/v2/health/ready`).

Docker's HEALTHCHECK, docker-compose and any exec probe use it, so the images need no
`grpc_health_probe` binary. It prints one line saying why it failed, for `docker inspect`.
"""

from __future__ import annotations

import argparse
import os
import sys
import urllib.error
import urllib.request

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.config import GrpcTls


def check_grpc(addr: str, service: str = "", timeout: float = 3.0) -> tuple[bool, str]:
    """Whether the gRPC server at `addr` reports `service` ("" = the whole server) as SERVING."""
    tls = GrpcTls.from_values(os.environ)  # under mTLS the probe needs the component's own certificate
    try:
        with (grpc.insecure_channel(addr) if tls is None
              else grpc.secure_channel(addr, grpc.ssl_channel_credentials(*_pem(tls)))) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
    except grpc.RpcError as error:
        return False, f"{addr}: {error.code().name}: {error.details()}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    return response.status == health_pb2.HealthCheckResponse.SERVING, f"{addr}: {status}"


def _pem(tls: GrpcTls) -> tuple[bytes, bytes, bytes]:
    """(CA, key, certificate), in the order ssl_channel_credentials takes them."""
    cert, key, ca = tls.read()
    return ca, key, cert


def check_http(url: str, timeout: float = 3.0) -> tuple[bool, str]:
    """Whether GET `url` answers 2xx."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return 200 <= response.status < 300, f"{url}: HTTP {response.status}"
    except urllib.error.HTTPError as error:
        return False, f"{url}: HTTP {error.code}"
    except (urllib.error.URLError, OSError) as error:
        return False, f"{url}: {error}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.common.healthcheck", description=__doc__.splitlines()[0])
    parser.add_argument("addr", help="host:port of a gRPC server, or an http:// URL")
    parser.add_argument("--service", default="", help="gRPC service name to ask about (default: the server)")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the answer")
    args = parser.parse_args(argv)
    if args.addr.startswith(("http://", "https://")):
        healthy, reason = check_http(args.addr, args.timeout)
    else:
        healthy, reason = check_grpc(args.addr, args.service, args.timeout)
    if not healthy:
        # A healthcheck's only output channel is its own stderr, which `docker inspect` shows.
        sys.stderr.write(f"unhealthy: {reason}\n")
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
