from __future__ import annotations

import math
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import pytest
from nats.aio.client import Client as NATS

from myelin import bus
from myelin.contracts import StreamEvent
from myelin.contracts.events import PurchaseV2
from myelin.sdk import InvalidEvent, Producer, UnencodableEvent
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


def _nested(depth: int) -> dict[str, Any]:
    d: dict[str, Any] = {}
    for _ in range(depth):
        d = {"a": d}
    return d


@pytest.mark.parametrize("validate", [True, False])
@pytest.mark.parametrize(
    ("type_", "data", "message"),
    [
        (
            "click",
            {"user_id": "u\ud800", "item_id": "i"},
            r"^\$\.data\.user_id: 'u\\ud800' is not valid Unicode: it holds the lone "
            r"surrogate U\+D800, which UTF-8 \(and so JSON\) cannot encode$",
        ),
        (
            "click",
            {"user_id": "u", "item_id": "i", "\udc80": 1},
            r"^\$\.data\['\\udc80'\]: '\\udc80' is not valid Unicode",
        ),
        (
            "click",
            {"user_id": "u", "item_id": "i", 7: "x"},
            r"^\$\.data: the key 7 is not a string \(JSON object keys are\)$",
        ),
        (
            "click",
            {"user_id": b"u", "item_id": "i"},
            r"^\$\.data\.user_id: bytes have no JSON form: decode them to str first$",
        ),
        (
            "purchase",
            {"user_id": "u", "item_id": "i", "amount": math.nan},
            r"^\$\.data\.amount: nan has no JSON form \(it would be sent as null\)$",
        ),
        (
            "purchase",
            {"user_id": "u", "item_id": "i", "amount": -math.inf},
            r"^\$\.data\.amount: -inf has no JSON form",
        ),
        (
            "impression",
            {"user_id": "u", "item_id": "i", "position": 2**64},
            r"^\$\.data\.position: the int is outside the 64-bit range events are stored in$",
        ),
        (
            "click",
            {"user_id": "u", "item_id": "i", "x": _nested(5000)},
            r"^\$\.data\.x(\.a){30}: nested more than 32 levels deep$",
        ),
        (
            "click",
            {"user_id": object(), "item_id": "i"},
            r"^\$\.data\.user_id: Encoding objects of type object is unsupported$",
        ),
    ],
    ids=[
        "lone-surrogate-value",
        "lone-surrogate-key",
        "int-key",
        "bytes",
        "nan",
        "minus-inf",
        "int-beyond-64-bits",
        "nested-5000-deep",
        "unknown-type",
    ],
)
async def test_a_value_json_cannot_carry_is_refused_naming_it(
    ingest: IngestApp,
    nc: NATS,
    settings: Settings,
    validate: bool,
    type_: str,
    data: dict[Any, Any],
    message: str,
) -> None:
    """Each kind of value JSON cannot carry as it is raises UnencodableEvent (an
    InvalidEvent) whose message starts with the field's path and says what is wrong, with
    or without local validation (before: UnicodeEncodeError, RecursionError or TypeError
    from inside msgspec, and NaN sent as null, bytes as base64). Nothing of it is queued:
    the event sent before it and the one after are stored, and nothing else."""
    version = 2 if type_ == "purchase" else 1
    async with Producer(settings.nats_url, producer_id="p", batch_size=2, validate=validate) as p:
        await p.send("click", 1, {"user_id": "u", "item_id": "i"}, event_id="before")
        with pytest.raises(UnencodableEvent, match=message) as err:
            await p.send(type_, version, data, event_id="hostile")
        assert err.value.code == "unencodable_event" and isinstance(err.value, InvalidEvent)
        assert str(err.value).startswith(str(err.value.details["path"]))
        await p.send("click", 1, {"user_id": "u", "item_id": "i"}, event_id="after")
    assert (p.accepted, p.rejected) == (2, [])
    assert sorted(e.event_id for e in await stored_events(nc, settings)) == ["after", "before"]


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
