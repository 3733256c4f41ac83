"""OpenTelemetry wiring, used at the boundaries only (bus, HTTP and gRPC adapters).

Trace context travels as W3C ``traceparent`` in NATS headers and gRPC metadata. Spans
are exported over OTLP/HTTP when ``MYELIN_OTLP_ENDPOINT`` is set, printed when
``MYELIN_TRACE_CONSOLE=1``, and otherwise only propagated.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping

from opentelemetry import context, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from myelin.settings import Settings

_PROPAGATOR = TraceContextTextMapPropagator()
_provider: TracerProvider | None = None


def setup_tracing(service: str, settings: Settings) -> TracerProvider:
    """Install the process-wide tracer provider once; later calls return it."""
    global _provider
    if _provider is not None:
        return _provider
    provider = TracerProvider(resource=Resource.create({"service.name": f"myelin-{service}"}))
    if settings.otlp_endpoint:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        endpoint = settings.otlp_endpoint.rstrip("/") + "/v1/traces"
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    if settings.trace_console:
        provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
    trace.set_tracer_provider(provider)
    _provider = provider
    return provider


def shutdown_tracing() -> None:
    if _provider is not None:
        _provider.shutdown()


def tracer(name: str) -> trace.Tracer:
    return trace.get_tracer(name)


def inject(carrier: MutableMapping[str, str]) -> MutableMapping[str, str]:
    """Write the current trace context into ``carrier`` (NATS headers, gRPC metadata)."""
    _PROPAGATOR.inject(carrier)
    return carrier


def extract(carrier: Mapping[str, str] | None) -> context.Context:
    return _PROPAGATOR.extract(dict(carrier or {}))


def trace_id_hex(span: trace.Span | None = None) -> str:
    """The 32-hex-digit trace id of ``span`` (or the current span); '' when none."""
    ctx = (span or trace.get_current_span()).get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else ""


def context_from_trace_id(trace_id: str) -> context.Context:
    """A parent context carrying ``trace_id``, so work done later joins the same trace."""
    try:
        tid = int(trace_id, 16)
    except ValueError:
        return context.Context()
    if not tid:
        return context.Context()
    # Deterministic, non-zero span id derived from the trace id: only the trace id matters.
    span_id = (tid & 0xFFFFFFFFFFFFFFFF) or 1
    parent = trace.SpanContext(
        trace_id=tid, span_id=span_id, is_remote=True, trace_flags=trace.TraceFlags(1)
    )
    return trace.set_span_in_context(trace.NonRecordingSpan(parent))
