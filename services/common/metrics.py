"""Prometheus metrics shared by every llmp process, and the endpoint that exposes them."""

from __future__ import annotations

import bisect
import logging
import math

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.utils import floatToGoString

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


class _LoopMetric:
    """What `LoopCounter` and `LoopHistogram` share: registration, and one child per label values, made by
    `_new_child` on first use. Single-threaded (event loop) use only."""

    family: type

    def __init__(self, name: str, documentation: str, labelnames: tuple[str, ...],
                 registry: CollectorRegistry) -> None:
        self.name, self.documentation, self.labelnames = name, documentation, labelnames
        self._children: dict[tuple[str, ...], object] = {}
        registry.register(self)

    def _new_child(self):
        raise NotImplementedError

    def child(self, *labels: str):
        found = self._children.get(labels)
        if found is None:
            found = self._children[labels] = self._new_child()
        return found

    def describe(self) -> list:
        return [self.family(self.name, self.documentation, labels=self.labelnames)]


class LoopCounter(_LoopMetric):
    """A labelled Prometheus counter for a hot path on one event loop: `child(*labels)` once, then
    `child.value += 1` per event, a plain attribute add with no lock and no label lookup (what
    `Counter.labels(...).inc()` costs is most of a 304's budget). Exposed at scrape time under `name`
    like any counter. Single-threaded use only: increments from several threads could be lost."""

    family = CounterMetricFamily

    def __init__(self, name: str, documentation: str, labelnames: tuple[str, ...] = (),
                 registry: CollectorRegistry = REGISTRY) -> None:
        super().__init__(name, documentation, labelnames, registry)

    def _new_child(self) -> _Count:
        return _Count()

    def collect(self) -> list[CounterMetricFamily]:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for labels, count in list(self._children.items()):
            family.add_metric(list(labels), count.value)
        return [family]


class LoopHistogram(_LoopMetric):
    """A labelled Prometheus histogram for a hot path on one event loop (see `LoopCounter`):
    `child(*labels).observe(seconds)` is one bisect and two adds."""

    family = HistogramMetricFamily

    def __init__(self, name: str, documentation: str, labelnames: tuple[str, ...] = (),
                 buckets: tuple[float, ...] = LATENCY_BUCKETS, registry: CollectorRegistry = REGISTRY) -> None:
        self.bounds = tuple(sorted(buckets))
        super().__init__(name, documentation, labelnames, registry)

    def _new_child(self) -> _Observations:
        return _Observations(self.bounds)

    def collect(self) -> list[HistogramMetricFamily]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for labels, observations in list(self._children.items()):
            named = dict(zip(self.labelnames, labels, strict=True))
            cumulative = 0
            for bound, count in zip((*self.bounds, math.inf), observations.counts, strict=True):
                cumulative += count
                family.add_sample(self.name + "_bucket", {**named, "le": floatToGoString(bound)}, cumulative)
            family.add_sample(self.name + "_count", named, cumulative)
            family.add_sample(self.name + "_sum", named, observations.sum)
        return [family]


class _Count:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0


class _Observations:
    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1  # bucket `le` bound: value <= bound
        self.sum += value
