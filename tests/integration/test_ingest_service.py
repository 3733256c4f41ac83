from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import msgspec
import pytest
from nats.aio.client import Client as NATS

from myelin import bus
from myelin.contracts import StreamEvent
from myelin.errors import RemoteError
from myelin.records import DeadLetter
from myelin.settings import Settings
from myelin.subjects import DLQ_STREAM, EVENTS_STREAM, RPC_INGEST_PUBLISH
from services.ingest.app import IngestApp

pytestmark = pytest.mark.integration


def click(i: int, **over: Any) -> dict[str, Any]:
    e = {
        "event_id": f"c{i}",
        "type": "click",
        "schema_version": 1,
        "event_time": int(time.time() * 1000),
        "producer_id": "p1",
        "data": {"user_id": f"u{i % 3}", "item_id": "i1"},
    }
    e.update(over)
    return e


@pytest.fixture
async def ingest(nc: NATS, settings: Settings) -> AsyncIterator[str]:
    app = IngestApp(settings)
    await app.start()
    try:
        yield f"http://127.0.0.1:{settings.ingest_http_port}/v1/events"
    finally:
        await app.stop()


async def post(url: str, body: Any, **kw: Any) -> tuple[int, dict[str, Any], dict[str, str]]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with aiohttp.ClientSession() as s, s.post(url, data=data, **kw) as r:
        return r.status, await r.json(), dict(r.headers)


async def stream_events(nc: NATS, settings: Settings, stream: str, subject: str) -> list[bytes]:
    js = bus.jetstream(nc, settings)
    n = (await js.stream_info(stream)).state.messages
    if not n:
        return []
    sub = await js.pull_subscribe(subject, stream=stream)
    out: list[bytes] = []
    while len(out) < n:
        out += [m.data for m in await sub.fetch(n - len(out), timeout=2)]
    return out


async def test_batch_is_stored_and_a_retry_is_a_no_op(
    ingest: str, nc: NATS, settings: Settings
) -> None:
    batch = [click(i) for i in range(50)]
    status, body, _ = await post(ingest, batch, headers={"Content-Type": "application/json"})
    assert status == 200 and body["accepted"] == 50
    status, body, _ = await post(ingest, batch)
    assert status == 200 and body["duplicates"] == 50 and body["accepted"] == 0
    stored = [
        e
        for d in await stream_events(nc, settings, EVENTS_STREAM, "myelin.events.>")
        for e in msgspec.msgpack.decode(d, type=list[StreamEvent])
    ]
    assert sorted(e.event_id for e in stored) == sorted(e["event_id"] for e in batch)
    assert all(e.trace_id and e.ingest_time and e.producer_id == "p1" for e in stored)


async def test_mixed_batch_reports_each_event_and_dead_letters_rejects(
    ingest: str, nc: NATS, settings: Settings
) -> None:
    batch = [click(1), click(2, data={"user_id": 7, "item_id": "x"}), click(3, type="nope")]
    status, body, _ = await post(ingest, batch)
    assert status == 207
    assert body["statuses"] == "arr"
    assert [(r["index"], r["reason"]) for r in body["results"]] == [
        (1, "invalid_payload"),
        (2, "unknown_type"),
    ]
    dead = [
        msgspec.msgpack.decode(d, type=DeadLetter)
        for d in await stream_events(nc, settings, DLQ_STREAM, "myelin.dlq.>")
    ]
    assert sorted(d.reason for d in dead) == ["invalid_payload", "unknown_type"]
    assert all(d.producer_id == "p1" and d.payload for d in dead)
    [msg] = await stream_events(nc, settings, EVENTS_STREAM, "myelin.events.>")
    assert len(msgspec.msgpack.decode(msg, type=list[StreamEvent])) == 1


@pytest.mark.parametrize(
    ("body", "headers", "status", "error"),
    [
        (b"[{oops", {}, 400, "malformed_json"),
        (b'{"a": 1}', {}, 400, "not_a_batch"),
        (b"[]", {"Content-Type": "text/plain"}, 415, "unsupported_media_type"),
    ],
)
async def test_bad_bodies_get_specific_errors(
    ingest: str, body: bytes, headers: dict[str, str], status: int, error: str
) -> None:
    got, payload, _ = await post(ingest, body, headers=headers)
    assert (got, payload["error"]) == (status, error)


async def test_strings_that_are_not_utf8_get_a_reason_not_a_500(ingest: str) -> None:
    """On main a lone surrogate encoded in UTF-8 (bytes ED A0 80) inside a string raised
    UnicodeDecodeError and the endpoint answered 500."""
    good = json.dumps(click(1)).encode()
    bad_data = (
        json.dumps(click(2))
        .encode()
        .replace(b'"u2"', b'"\xed\xa0\x80"'.decode("unicode_escape").encode("latin-1"))
    )
    bad_id = (
        json.dumps(click(3))
        .encode()
        .replace(b'"c3"', b'"c\xff3"'.decode("unicode_escape").encode("latin-1"))
    )
    status, body, _ = await post(ingest, b"[" + b",".join([good, bad_data, bad_id]) + b"]")
    assert status == 207 and body["statuses"] == "arr"
    reasons = {r["index"]: (r["reason"], r["message"]) for r in body["results"]}
    assert reasons[1][0] == "invalid_payload" and "not valid UTF-8" in reasons[1][1]
    assert reasons[2][0] == "invalid_envelope" and "not valid UTF-8" in reasons[2][1]


async def test_all_rejected_is_422(ingest: str) -> None:
    status, body, _ = await post(ingest, [click(1, schema_version=3)])
    assert status == 422 and body["results"][0]["reason"] == "unknown_version"


async def test_oversized_batch_is_413(nc: NATS, settings: Settings) -> None:
    from dataclasses import replace

    app = IngestApp(replace(settings, max_batch_bytes=2048))
    await app.start()
    try:
        url = f"http://127.0.0.1:{settings.ingest_http_port}/v1/events"
        status, body, _ = await post(url, [click(i) for i in range(100)])
        assert status == 413 and body["error"] == "batch_too_large"
    finally:
        await app.stop()


async def test_nats_endpoint_has_the_same_contract(ingest: str, nc: NATS) -> None:
    res = msgspec.json.decode(
        await bus.request(nc, RPC_INGEST_PUBLISH, [click(1), click(2, type="x")])
    )
    assert (res["accepted"], res["rejected"]) == (1, 1)
    with pytest.raises(RemoteError) as err:
        await bus.request(nc, RPC_INGEST_PUBLISH, b"not json")
    assert err.value.code == "malformed_json"


async def test_w3c_traceparent_becomes_the_events_trace_id(
    ingest: str, nc: NATS, settings: Settings
) -> None:
    trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    status, _, _ = await post(
        ingest,
        [click(1), click(2, trace_id="own")],
        headers={"traceparent": f"00-{trace}-00f067aa0ba902b7-01"},
    )
    assert status == 200
    stored = {
        e.event_id: e.trace_id
        for d in await stream_events(nc, settings, EVENTS_STREAM, "myelin.events.>")
        for e in msgspec.msgpack.decode(d, type=list[StreamEvent])
    }
    assert stored == {"c1": trace, "c2": "own"}  # a producer's own trace id wins
