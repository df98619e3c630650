"""OpenTelemetry tracing for every llmp process, on only when LLMP_OTEL_ENDPOINT is set.

One tracer provider per process, exporting OTLP/gRPC. A service's gRPC server continues the trace the
caller put in the call's metadata (W3C `traceparent`, written by the client interceptors on the channels
of the gateway or of another service, `grpc_client.ServiceClients`), so one request is one trace across
the gateway and the services.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from services.common.config import Settings

if TYPE_CHECKING:
    import grpc
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter

_process_provider: TracerProvider | None = None


def tracer_provider(settings: Settings, service_name: str,
                    exporter: SpanExporter | None = None) -> TracerProvider | None:
    """A provider exporting over OTLP/gRPC to LLMP_OTEL_ENDPOINT (or to `exporter`, for tests); None, and so
    no tracing at all, when neither is given."""
    endpoint = settings.raw.get("LLMP_OTEL_ENDPOINT", "")
    if not endpoint and exporter is None:
        return None
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    if endpoint:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider


def configure_process(settings: Settings, component: str) -> TracerProvider | None:
    """Called once by a service's entry point: the process's provider (None when tracing is off), which
    its gRPC server and its clients to other services trace with unless given another."""
    global _process_provider
    _process_provider = tracer_provider(settings, f"llmp-{component}")
    return _process_provider


def process_provider() -> TracerProvider | None:
    return _process_provider


def shutdown_process() -> None:
    """Flush what the batch processor still holds."""
    if _process_provider is not None:
        _process_provider.shutdown()


def server_interceptors(provider: TracerProvider | None) -> list[grpc.aio.ServerInterceptor]:
    """One SERVER span per call, continuing the caller's trace; nothing when tracing is off."""
    if provider is None:
        return []
    from opentelemetry.instrumentation.grpc import aio_server_interceptor

    return [aio_server_interceptor(tracer_provider=provider)]


def client_interceptors(provider: TracerProvider | None) -> list[grpc.aio.ClientInterceptor]:
    """One CLIENT span per call, the trace context sent in its metadata; nothing when tracing is off."""
    if provider is None:
        return []
    from opentelemetry.instrumentation.grpc import aio_client_interceptors

    return aio_client_interceptors(tracer_provider=provider)
