"""OpenTelemetry wiring, used at the boundaries only (bus, HTTP and gRPC adapters).

Trace context travels as W3C ``traceparent`` in NATS headers and gRPC metadata. Spans
are exported over OTLP/HTTP when ``MYELIN_OTLP_ENDPOINT`` is set, printed when
``MYELIN_TRACE_CONSOLE=1``, and otherwise only propagated.

Metrics: each service's status counters are observed (read when scraped, nothing on the
hot path) and served for Prometheus at ``http://127.0.0.1:$MYELIN_METRICS_PORT/metrics``
when that port is set, as ``myelin_<service>_<name>`` (counters end in ``_total``).
"""

from __future__ import annotations

import contextlib
import functools
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, MutableMapping
from typing import Any

from opentelemetry import context, metrics, trace
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from myelin import slis
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


@functools.cache
def tracer(name: str) -> trace.Tracer:
    """A tracer per name, made once (a proxy until tracing is set up, then the real one)."""
    return trace.get_tracer(name)


def inject(carrier: MutableMapping[str, str]) -> MutableMapping[str, str]:
    """Write the current trace context into ``carrier`` (NATS headers, gRPC metadata)."""
    _PROPAGATOR.inject(carrier)
    return carrier


def extract(carrier: Mapping[str, str] | None) -> context.Context:
    return _PROPAGATOR.extract(dict(carrier or {}))


MAX_LINKS = 128  # the SDK's default cap of links per span


_TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")


@functools.lru_cache(maxsize=4096)
def _parse_traceparent(header: str) -> trace.SpanContext | None:
    m = _TRACEPARENT.match(header.strip())
    if m is None:
        return None
    tid, sid = int(m.group(1), 16), int(m.group(2), 16)
    if not tid or not sid:
        return None
    return trace.SpanContext(
        trace_id=tid, span_id=sid, is_remote=True, trace_flags=trace.TraceFlags(int(m.group(3), 16))
    )


def span_context_of(carrier: Mapping[str, str] | None) -> trace.SpanContext | None:
    """The remote span context a W3C ``traceparent`` header carries (version 00); None
    when there is none. Parsed directly and cached: every consumer batch reads one per
    message, and a batch's messages mostly share a few."""
    header = carrier.get("traceparent") if carrier else None
    return _parse_traceparent(header) if header else None


def links_to(contexts: Iterable[trace.SpanContext | None]) -> list[trace.Link]:
    """One link per distinct trace (at most :data:`MAX_LINKS`)."""
    links: list[trace.Link] = []
    seen: set[int] = set()
    for sc in contexts:
        if sc is None or sc.trace_id in seen:
            continue
        seen.add(sc.trace_id)
        links.append(trace.Link(sc))
        if len(links) == MAX_LINKS:
            break
    return links


def span_context_of_trace_id(trace_id: str) -> trace.SpanContext | None:
    """A remote span context in the trace ``trace_id`` (32 hex digits), for a link to a
    trace known only by its id (events and records carry their trace id)."""
    try:
        tid = int(trace_id, 16)
    except ValueError:
        return None
    if not tid or tid >> 128:
        return None
    # deterministic, non-zero span id derived from the trace id: only the trace id matters
    return trace.SpanContext(
        trace_id=tid,
        span_id=(tid & 0xFFFFFFFFFFFFFFFF) or 1,
        is_remote=True,
        trace_flags=trace.TraceFlags(1),
    )


def link_traces(span: trace.Span, trace_ids: Iterable[str], limit: int = MAX_LINKS) -> None:
    """Link ``span`` to each distinct trace of ``trace_ids`` (at most ``limit``)."""
    if not span.is_recording():
        return
    seen: set[str] = set()
    for tid in trace_ids:
        if tid in seen:
            continue
        seen.add(tid)
        sc = span_context_of_trace_id(tid)
        if sc is not None:
            span.add_link(sc)
        if len(seen) >= limit:
            return


@contextlib.contextmanager
def batch_span(
    tracer_name: str,
    name: str,
    items: Iterable[trace.SpanContext | None],
    attributes: Mapping[str, str | int] | None = None,
) -> Iterator[trace.Span]:
    """A span for a batch: a child of the first item's trace, linked to the trace of every
    item it carries (a batch mixes many requests' events). ``items``: each message's or
    record's span context (:func:`span_context_of`, :func:`span_context_of_trace_id`)."""
    contexts = list(items)
    first = next((sc for sc in contexts if sc is not None), None)
    parent = (
        trace.set_span_in_context(trace.NonRecordingSpan(first))
        if first is not None
        else context.Context()
    )
    with tracer(tracer_name).start_as_current_span(
        name,
        context=parent,
        links=links_to(contexts),
        attributes=dict(attributes or {}),
        kind=trace.SpanKind.CONSUMER,
    ) as span:
        yield span


def trace_id_hex(span: trace.Span | None = None) -> str:
    """The 32-hex-digit trace id of ``span`` (or the current span); '' when none."""
    ctx = (span or trace.get_current_span()).get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else ""


def context_from_trace_id(trace_id: str) -> context.Context:
    """A parent context carrying ``trace_id``, so work done later joins the same trace."""
    sc = span_context_of_trace_id(trace_id)
    if sc is None:
        return context.Context()
    return trace.set_span_in_context(trace.NonRecordingSpan(sc))


# Status fields that only ever grow: exported as counters; every other number is a gauge.
MONOTONIC = frozenset(
    {
        "accepted",
        "duplicates",
        "rejected",
        "refused_batches",
        "overloaded",
        "events",
        "messages",
        "applied",
        "late",
        "undecodable",
        "feature_rows",
        "requests",
        "predictions",
        "recorded",
        "records_dropped",
        "records_deduplicated",
        "dead_lettered",
        "decisions",
        "denials",
        "swaps",
        "shadow_scored",
        "predict_batches",
        "predict_batches_lingered",
        "shadow_dropped",
        "shadow_failed",
        "drift_windows",
        "drift_detected",
    }
)


def setup_metrics(
    service: str, settings: Settings, status: Callable[[], Mapping[str, Any]]
) -> MeterProvider:
    """Serve ``status()``'s numbers as Prometheus metrics when ``MYELIN_METRICS_PORT`` is set."""
    readers = []
    if settings.metrics_port:
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
        from prometheus_client import start_http_server

        start_http_server(settings.metrics_port, addr=settings.host)
        readers.append(PrometheusMetricReader())
    provider = MeterProvider(
        metric_readers=readers,
        resource=Resource.create({"service.name": f"myelin-{service}"}),
        views=slis.views(),
    )
    metrics.set_meter_provider(provider)
    observe_status(provider, service, status)
    observe_consumers(provider)
    return provider


def observe_consumers(provider: MeterProvider) -> None:
    """Lag of every pull consumer running in this process, by durable name."""
    from myelin.consume import RUNNING

    meter = provider.get_meter("myelin.sli")

    def messages(_options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(loop.pending, {"durable": loop.durable}) for loop in list(RUNNING)]

    def seconds(_options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(loop.lag_seconds, {"durable": loop.durable}) for loop in list(RUNNING)]

    meter.create_observable_gauge(slis.CONSUMER_LAG_MESSAGES, callbacks=[messages])
    meter.create_observable_gauge(slis.CONSUMER_LAG_SECONDS, callbacks=[seconds], unit="s")


def _numbers(status: Mapping[str, Any]) -> Iterable[tuple[str, float, dict[str, str]]]:
    for key, value in status.items():
        if isinstance(value, bool | int | float):
            yield key, float(value), {}
        elif isinstance(value, dict):  # e.g. rejected_by_reason: one series per key
            for sub, v in value.items():
                if isinstance(v, int | float) and not isinstance(v, bool):
                    yield key, float(v), {"key": str(sub)}


def observe_status(
    provider: MeterProvider, service: str, status: Callable[[], Mapping[str, Any]]
) -> None:
    """One observable instrument per numeric status field, read at collection time."""
    meter = provider.get_meter(f"myelin.{service}")
    # numbers, and maps of numbers (one series per key), even while a map is still empty
    keys = [
        k
        for k, v in status().items()
        if isinstance(v, bool | int | float | dict) and not (k.endswith("_ms") or k == "pid")
    ]
    for key in keys:

        def callback(_options: CallbackOptions, key: str = key) -> Iterable[Observation]:
            return [Observation(v, attrs) for k, v, attrs in _numbers(status()) if k == key]

        name = f"myelin_{service}_{key}"
        if key in MONOTONIC or key.endswith("_by_reason"):
            meter.create_observable_counter(name, callbacks=[callback])
        else:
            meter.create_observable_gauge(name, callbacks=[callback])
