"""One trace across every hop, on real engines with the services in this process and the
OpenTelemetry SDK's in-memory exporter: a client's trace goes through ingest (HTTP), the
EVENTS stream, the features consumer (batch span linked to every message's trace), the
FEATURES stream, Predict (gRPC metadata; linked to the traces of the events behind its
features) and the inference record (INFERENCES); a rejected event's dead letter (DLQ)
carries the trace of the request that sent it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from typing import Any

import aiohttp
import grpc
import msgspec
import pytest
from nats.aio.client import Client as NATS
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from myelin import bus, telemetry
from myelin.gen import myelin_predict_pb2 as mp
from myelin.gen import myelin_predict_pb2_grpc as mp_grpc
from myelin.settings import Settings
from myelin.subjects import DLQ_STREAM, FEATURES_STREAM, INFERENCES_STREAM
from services.features.app import FeaturesApp
from services.governance.app import GovernanceApp
from services.inference.app import InferenceApp
from services.ingest.app import IngestApp
from tests.helpers import register, tiny_model

pytestmark = pytest.mark.integration


@pytest.fixture
def spans(settings: Settings) -> Iterator[InMemorySpanExporter]:
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = telemetry.setup_tracing("test", replace(settings, otlp_endpoint=""))
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    try:
        yield exporter
    finally:
        exporter.shutdown()  # the processor stays on the provider, exporting nothing


@pytest.fixture
async def platform(nc: NATS, settings: Settings, redis_client: Any) -> AsyncIterator[int]:
    """Governance, ingest, features and inference in this process; the inference port."""
    apps: list[Any] = []
    try:
        for app in (GovernanceApp(settings), IngestApp(settings), FeaturesApp(settings)):
            await app.start()
            apps.append(app)
        await register(nc, settings, tiny_model())
        inf = InferenceApp(settings)
        await inf.start()
        apps.append(inf)
        yield inf.port
    finally:
        for app in reversed(apps):
            await app.stop()


def trace_of(header: str | None) -> int:
    sc = telemetry.span_context_of({"traceparent": header} if header else None)
    return sc.trace_id if sc is not None else 0


async def headers_on(nc: NATS, settings: Settings, stream: str) -> list[dict[str, str]]:
    js = bus.jetstream(nc, settings)
    n = (await js.stream_info(stream)).state.messages
    sub = await js.pull_subscribe(">", stream=stream)
    try:
        msgs = await sub.fetch(n, timeout=5) if n else []
    finally:
        await sub.unsubscribe()
    return [dict(m.headers or {}) for m in msgs]


async def wait_for(exporter: InMemorySpanExporter, name: str, timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while not any((s.name or "").startswith(name) for s in exporter.get_finished_spans()):
        assert time.monotonic() < deadline, f"no span {name!r} in {timeout_s} s"
        await asyncio.sleep(0.05)


def named(exporter: InMemorySpanExporter, prefix: str) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if (s.name or "").startswith(prefix)]


def linked(span: ReadableSpan) -> set[int]:
    return {link.context.trace_id for link in span.links}


async def test_one_trace_from_ingest_through_features_and_predict_to_the_record(
    spans: InMemorySpanExporter, platform: int, nc: NATS, settings: Settings
) -> None:
    url = f"http://127.0.0.1:{settings.ingest_http_port}/v1/events"
    now = int(time.time() * 1000)
    event = {
        "event_id": "traced-1",
        "type": "click",
        "schema_version": 1,
        "event_time": now - 1000,
        "data": {"user_id": "traced-user", "item_id": "i1"},
    }
    tracer = telemetry.tracer("test-client")
    with tracer.start_as_current_span("a decision") as root:
        t = root.get_span_context().trace_id
        async with (
            aiohttp.ClientSession() as http,
            http.post(url, json=[event], headers=telemetry.inject({})) as r,
        ):
            assert r.status == 200, await r.text()
        await wait_for(spans, "features batch")
        md = tuple(telemetry.inject({}).items())
        async with grpc.aio.insecure_channel(f"127.0.0.1:{platform}") as ch:
            resp = await mp_grpc.PredictorStub(ch).Predict(
                mp.PredictRequest(model_name="ctr", entity_ids=["traced-user"]), metadata=md
            )
        assert resp.predictions[0].feature_status == "FRESH"
        assert int(resp.trace_id, 16) == t  # the record's trace, as the caller sees it
    await wait_for(spans, "record inferences")

    # ingest: the HTTP span is in the client's trace, and so is the EVENTS message
    (ingest_span,) = named(spans, "POST /v1/events")
    assert ingest_span.context is not None and ingest_span.context.trace_id == t
    # features: the consumer's batch span continues it and links it; the features span is
    # its child; the FEATURES rows it published carry the same trace
    consume = [s for s in named(spans, "consume features-") if t in linked(s)]
    assert consume and all(s.context is not None and s.context.trace_id == t for s in consume)
    feature_spans = named(spans, "features batch")
    assert any(
        s.parent is not None and s.parent.span_id == consume[0].context.span_id
        for s in feature_spans
    )
    fv = await headers_on(nc, settings, FEATURES_STREAM)
    assert fv and all(trace_of(h.get("traceparent")) == t for h in fv)
    # Predict: in the caller's trace, linked to the trace of the event behind its features
    (predict,) = named(spans, "Predict")
    assert predict.context is not None and predict.context.trace_id == t
    assert t in linked(predict)
    # the inference record: its batch span and its INFERENCES message are in the trace too
    (record,) = named(spans, "record inferences")
    assert record.context is not None and record.context.trace_id == t and t in linked(record)
    inf = await headers_on(nc, settings, INFERENCES_STREAM)
    assert [trace_of(h.get("traceparent")) for h in inf] == [t]


async def test_a_dead_letter_carries_the_trace_of_the_request_that_sent_it(
    spans: InMemorySpanExporter, platform: int, nc: NATS, settings: Settings
) -> None:
    url = f"http://127.0.0.1:{settings.ingest_http_port}/v1/events"
    bad = {"event_id": "b1", "type": "click", "schema_version": 1, "data": {"user_id": 7}}
    with telemetry.tracer("test-client").start_as_current_span("bad producer") as root:
        async with (
            aiohttp.ClientSession() as http,
            http.post(url, json=[bad], headers=telemetry.inject({})) as r,
        ):
            body = msgspec.json.decode(await r.read())
            assert r.status == 422 and body["rejected"] == 1
    dlq = await headers_on(nc, settings, DLQ_STREAM)
    assert [trace_of(h.get("traceparent")) for h in dlq] == [root.get_span_context().trace_id]
