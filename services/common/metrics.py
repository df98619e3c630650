"""Prometheus metrics shared by every llmp process, and the endpoint that exposes them."""

from __future__ import annotations

import logging

from prometheus_client import Counter, Histogram, start_http_server

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

GRPC_REQUESTS = Counter("llmp_grpc_requests_total", "gRPC calls served", ["service", "method", "code"])
GRPC_LATENCY = Histogram("llmp_grpc_request_seconds", "gRPC call latency", ["service", "method"],
                         buckets=LATENCY_BUCKETS)

_serving: set[int] = set()


def serve(port: int, host: str = "127.0.0.1") -> None:
    """Expose /metrics over HTTP on `port` (once per process; 0 disables)."""
    if port <= 0 or port in _serving:
        return
    try:
        start_http_server(port, addr=host)
    except OSError as error:  # a busy metrics port must not keep the service down
        log.warning("metrics endpoint unavailable", extra={"port": port, "error": str(error)})
        return
    _serving.add(port)
