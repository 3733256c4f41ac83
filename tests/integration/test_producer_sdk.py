from __future__ import annotations

from collections.abc import AsyncIterator

import msgspec
import pytest
from nats.aio.client import Client as NATS

from myelin import bus
from myelin.contracts import StreamEvent
from myelin.contracts.events import PurchaseV2
from myelin.sdk import InvalidEvent, Producer
from myelin.settings import Settings
from myelin.subjects import EVENTS_STREAM, ingest_subject
from services.ingest.app import IngestApp

pytestmark = pytest.mark.integration


@pytest.fixture
async def ingest(nc: NATS, settings: Settings) -> AsyncIterator[IngestApp]:
    app = IngestApp(settings)
    await app.start()
    try:
        yield app
    finally:
        await app.stop()


async def stored_events(nc: NATS, settings: Settings) -> list[StreamEvent]:
    js = bus.jetstream(nc, settings)
    n = (await js.stream_info(EVENTS_STREAM)).state.messages
    sub = await js.pull_subscribe("myelin.events.>", stream=EVENTS_STREAM)
    out: list[StreamEvent] = []
    got = 0
    while got < n:
        msgs = await sub.fetch(n - got, timeout=2)
        got += len(msgs)
        for m in msgs:
            out += msgspec.msgpack.decode(m.data, type=list[StreamEvent])
    return out


async def test_sdk_validates_locally_batches_and_flushes_on_close(
    ingest: IngestApp, nc: NATS, settings: Settings
) -> None:
    async with Producer(
        settings.nats_url, producer_id="checkout", batch_size=64, linger_s=0.01
    ) as p:
        with pytest.raises(InvalidEvent, match=r"\$.data.amount"):
            await p.send("purchase", 2, {"user_id": "u", "item_id": "i", "amount": "lots"})
        with pytest.raises(InvalidEvent, match="no contract purchase v9"):
            await p.send("purchase", 9, {})
        ids = [
            await p.send(
                "purchase",
                2,
                {
                    "user_id": f"u{i}",
                    "item_id": "i",
                    "amount": 1.0,
                    "email": f"buyer{i}@example.org",
                },
            )
            for i in range(300)
        ]
        p.validate = False  # what ingest does with what slips through: rejected, and reported
        await p.send("click", 1, {"user_id": 7, "item_id": "i"}, event_id="bad-one")
    assert p.accepted == 300 and p.rejected[0]["event_id"] == "bad-one"
    stored = await stored_events(nc, settings)
    assert sorted(e.event_id for e in stored) == sorted(ids)
    assert all(
        e.producer_id == "checkout" and e.client_version.startswith("myelin-sdk/") for e in stored
    )
    emails = {msgspec.msgpack.decode(e.data, type=PurchaseV2).email for e in stored}
    assert all(x.startswith("pii:") for x in emails)


async def test_resending_the_same_ids_is_a_no_op(
    ingest: IngestApp, nc: NATS, settings: Settings
) -> None:
    for _ in range(2):
        async with Producer(settings.nats_url, producer_id="p", batch_size=10) as p:
            for i in range(25):
                await p.send(
                    "click", 1, {"user_id": f"u{i}", "item_id": "i"}, event_id=f"fixed-{i}"
                )
    assert p.duplicates == 25 and p.accepted == 0
    assert len(await stored_events(nc, settings)) == 25


async def test_plain_nats_producers_get_the_same_validation(
    ingest: IngestApp, nc: NATS, settings: Settings
) -> None:
    import asyncio
    import time

    js = bus.jetstream(nc, settings)
    now = int(time.time() * 1000)
    good = {
        "event_id": "raw-1",
        "type": "click",
        "schema_version": 1,
        "event_time": now,
        "data": {"user_id": "u1", "item_id": "i"},
    }
    bad = {**good, "event_id": "raw-2", "data": {"user_id": 1}}
    await js.publish(ingest_subject("legacy"), msgspec.json.encode(good))
    await js.publish(ingest_subject("legacy"), msgspec.json.encode([bad]))
    await js.publish(ingest_subject("legacy"), b"{not json")
    for _ in range(100):
        status = ingest.status()
        if status["accepted"] == 1 and status["rejected"] == 1 and status["refused_batches"] == 1:
            break
        await asyncio.sleep(0.05)
    assert (status["accepted"], status["rejected"], status["refused_batches"]) == (1, 1, 1)
    assert [e.event_id for e in await stored_events(nc, settings)] == ["raw-1"]
