from __future__ import annotations

import time
from typing import Any

import msgspec
import pytest
import redis.asyncio as aioredis
from nats.aio.client import Client as NATS

from myelin import bus, online
from myelin.contracts import StreamEvent, default_registry
from myelin.online import OnlineReader, Status
from myelin.records import FeatureRows, LateEvents
from myelin.settings import Settings
from myelin.stack.engines import RedisServer
from myelin.subjects import FEATURES_STREAM, LATE_STREAM
from services.features.feature_rows import rows_publisher
from services.features.late_sink import late_publisher
from services.features.logic import WindowEngine
from services.features.online_store import OnlineStore
from services.features.pipeline import FeaturePipeline
from services.features.views import USER_ACTIVITY

pytestmark = pytest.mark.integration
MIN = 60_000
_mp = msgspec.msgpack.Encoder()


def event(
    seq: int, typ: str, user: str, t: int, event_id: str = "", **data: Any
) -> tuple[int, bytes]:
    payload = {"user_id": user, "item_id": "i", **data}
    return seq, _mp.encode(
        [
            StreamEvent(
                event_id=event_id or f"e{seq}",
                type=typ,
                schema_version=1,
                event_time=t,
                ingest_time=t,
                producer_id="p",
                client_version="",
                trace_id=f"{seq:032x}",
                entity_id=user,
                partition=0,
                data=msgspec.Raw(_mp.encode(payload)),
            )
        ]
    )


def pipeline(redis_client: aioredis.Redis, nc: NATS, settings: Settings) -> FeaturePipeline:
    return FeaturePipeline(
        WindowEngine(USER_ACTIVITY),
        default_registry(),
        OnlineStore(redis_client, USER_ACTIVITY, 3600),
        rows_publisher(bus.Publisher(bus.jetstream(nc, settings), settings)),
    )


async def published_rows(nc: NATS, settings: Settings) -> list[FeatureRows]:
    """Every message on the FEATURES stream (what the warehouse drains)."""
    js = bus.jetstream(nc, settings)
    n = (await js.stream_info(FEATURES_STREAM)).state.messages
    if not n:
        return []
    sub = await js.pull_subscribe("myelin.features.>", stream=FEATURES_STREAM)
    msgs = await sub.fetch(n, timeout=2)
    for m in msgs:
        await m.ack()
    await sub.unsubscribe()
    return [msgspec.msgpack.decode(m.data, type=FeatureRows) for m in msgs]


async def test_batches_apply_once_and_land_in_both_stores(
    redis_client: aioredis.Redis, nc: NATS, settings: Settings
) -> None:
    now = int(time.time() * 1000)
    t0 = now - 30 * MIN
    batch = [
        event(1, "impression", "a", t0),
        event(2, "impression", "a", t0 + 1),
        event(3, "click", "a", t0 + 2),
        event(4, "purchase", "b", t0 + 3, amount=12.5),
        event(5, "impression", "a", t0 + 20 * MIN),
    ]
    p = pipeline(redis_client, nc, settings)
    assert await p.start() == 0
    await p.process(batch[:3])
    await p.process(batch)  # a redelivery overlapping the first batch
    # a fresh process (empty cache) replays everything: nothing changes
    p2 = pipeline(redis_client, nc, settings)
    assert await p2.start() == 5
    await p2.process(batch)
    # even past the position guard (its key gone), the per-entity sequence guard holds
    await redis_client.delete(online.position_key("user_activity", USER_ACTIVITY.content_hash, 0))
    p2.stats.position = 0
    await p2.process(batch)
    assert p2.stats.applied == 0 and p2.stats.duplicates == 5

    reader = OnlineReader(redis_client)
    a, b, c = await reader.read("user_activity", ["a", "b", "nobody"], now_ms=now)
    va = dict(zip(USER_ACTIVITY.feature_names, a.values, strict=True))
    assert (
        va["impressions_1h"] == 3 and va["clicks_1h"] == 1 and va["ctr_1h"] == pytest.approx(1 / 3)
    )
    assert va["impressions_10m"] == 1 and va["clicks_10m"] == 0
    assert a.seq == 5000 and a.as_of_ms == t0 + 20 * MIN and a.trace_id == f"{5:032x}"
    assert a.status == Status.FRESH
    vb = dict(zip(USER_ACTIVITY.feature_names, b.values, strict=True))
    assert vb["spend_1h"] == 12.5 and b.status == Status.STALE  # 30 min old > 15 min freshness SLO
    assert c.status == Status.MISSING

    # offline values: one row per applied event, published once (the redeliveries above
    # applied nothing, so they published nothing)
    published = await published_rows(nc, settings)
    assert {(b.view, b.version) for b in published} == {
        ("user_activity", USER_ACTIVITY.content_hash)
    }
    imp = USER_ACTIVITY.feature_names.index("impressions_1h")
    rows_a = sorted(
        (r.stream_seq, r.values[imp]) for b in published for r in b.rows if r.entity_id == "a"
    )
    assert rows_a == [(1000, 1.0), (2000, 2.0), (3000, 2.0), (5000, 3.0)]
    assert sum(len(b.rows) for b in published) == 5


async def test_an_event_resent_in_another_batch_after_a_restart_counts_once(
    redis_client: aioredis.Redis, nc: NATS, settings: Settings
) -> None:
    """On main the same event stored twice on the stream (another batch, another ingest
    worker, another path) was counted twice online and in feature_values."""
    t0 = int(time.time() * 1000) - 10 * MIN
    p = pipeline(redis_client, nc, settings)
    await p.start()
    await p.process([event(1, "purchase", "a", t0, "order-1", amount=5.0)])
    await p.process([event(2, "click", "a", t0 + 1)])
    p2 = pipeline(redis_client, nc, settings)  # a restart: states come back from Redis
    await p2.start()
    await p2.process(
        [event(3, "purchase", "a", t0, "order-1", amount=5.0), event(4, "click", "a", t0 + 2)]
    )
    assert (p2.stats.applied, p2.stats.duplicates) == (1, 1)
    [a] = await OnlineReader(redis_client).read("user_activity", ["a"])
    va = dict(zip(USER_ACTIVITY.feature_names, a.values, strict=True))
    assert va["purchases_1h"] == 1 and va["spend_1h"] == 5.0 and va["clicks_1h"] == 2
    rows = [r for b in await published_rows(nc, settings) for r in b.rows]
    assert sorted(r.stream_seq for r in rows) == [1000, 2000, 4000]  # none for the resent copy


async def test_expired_values_are_not_served(
    redis_client: aioredis.Redis, nc: NATS, settings: Settings
) -> None:
    now = int(time.time() * 1000)
    p = pipeline(redis_client, nc, settings)
    await p.start()
    await p.process([event(1, "click", "old", now - 2 * 86_400_000 + MIN)])
    [v] = await OnlineReader(redis_client).read("user_activity", ["old"], now_ms=now)
    assert v.status == Status.EXPIRED
    assert all(x != x for x in v.values)  # NaN: TTL is enforced on read


async def test_clients_from_connect_survive_a_redis_restart(
    redis_server: RedisServer, nc: NATS, settings: Settings
) -> None:
    # Redis.from_url alone retries nothing: the first command on each pooled connection
    # after a restart fails with "Connection closed by server" (seen in CI).
    now = int(time.time() * 1000)
    client = online.connect(redis_server.url)
    try:
        p = pipeline(client, nc, settings)
        await p.start()
        await p.process([event(1, "click", "u1", now)])
        reader = OnlineReader(client)
        [before] = await reader.read("user_activity", ["u1"], now_ms=now)
        assert before.status == Status.FRESH
        await redis_server.stop()
        redis_server.start()  # the append-only file brings the record back
        await redis_server.wait_ready()
        [v] = await reader.read("user_activity", ["u1"], now_ms=now)
        assert (v.seq, v.as_of_ms, repr(v.values)) == (
            before.seq,
            before.as_of_ms,
            repr(before.values),
        )
        await p.process([event(2, "click", "u1", now + 1)])  # the write path reconnects too
        [v] = await reader.read("user_activity", ["u1"], now_ms=now + 1)
        assert v.seq > before.seq and v.values[1] == before.values[1] + 1  # one more click
    finally:
        await client.aclose()


async def test_the_ttl_sweep_deletes_only_expired_entities(
    redis_client: aioredis.Redis, nc: NATS, settings: Settings
) -> None:
    now = int(time.time() * 1000)
    p = pipeline(redis_client, nc, settings)
    await p.start()
    await p.process([event(1, "click", "old", now - 2 * 86_400_000), event(2, "click", "new", now)])
    assert await p.online.sweep(now) == 1
    old, new = await OnlineReader(redis_client).read("user_activity", ["old", "new"], now_ms=now)
    assert old.status == Status.MISSING and new.status == Status.FRESH


async def test_late_events_are_counted_and_sent_to_the_late_stream(
    redis_client: aioredis.Redis, nc: NATS, settings: Settings
) -> None:
    now = int(time.time() * 1000)
    p = pipeline(redis_client, nc, settings)
    p._late_sink = late_publisher(bus.Publisher(bus.jetstream(nc, settings), settings))
    batch = [event(1, "click", "a", now), event(2, "click", "a", now - 3 * 3600_000)]
    await p.start()
    await p.process(batch)
    assert p.stats.late == 1
    await redis_client.delete(online.position_key("user_activity", USER_ACTIVITY.content_hash, 0))
    p.stats.position = 0
    p.cache.clear()
    await p.process(batch)  # a replay publishes the LATE message once (same id)
    js = bus.jetstream(nc, settings)
    assert (await js.stream_info(LATE_STREAM)).state.messages == 1
    sub = await js.pull_subscribe("myelin.late.>", stream=LATE_STREAM)
    [msg] = await sub.fetch(1, timeout=2)
    assert msg.subject == "myelin.late.user_activity"
    late = msgspec.msgpack.decode(msg.data, type=LateEvents)
    assert [e.event_id for e in late.events] == ["e2"]
    assert late.seqs == [2000]  # where it sits in raw history, in the payload (not a header)


async def test_lateness_is_judged_by_the_partition_watermark(
    redis_client: aioredis.Redis, nc: NATS, settings: Settings
) -> None:
    now = int(time.time() * 1000)
    p = pipeline(redis_client, nc, settings)
    await p.start()
    # entity "a" moves partition 0's watermark to now; "b" (new, same partition) arrives
    # 90 minutes behind it: beyond the view's allowed lateness (1 h), so late, although b
    # itself has seen nothing newer; "c" 30 minutes behind is within it and applied.
    await p.process(
        [
            event(1, "click", "a", now),
            event(2, "click", "b", now - 90 * MIN),
            event(3, "click", "c", now - 30 * MIN),
        ]
    )
    assert p.stats.late == 1 and p.stats.applied == 2
    assert await p.online.watermarks() == {0: now}  # stored with the batch
    p2 = pipeline(redis_client, nc, settings)
    await p2.start()
    assert p2.watermarks == {0: now}  # a restart resumes with the partition watermarks
    b, c = await OnlineReader(redis_client).read("user_activity", ["b", "c"], now_ms=now)
    assert b.seq == 2000 and b.as_of_ms == 0  # seen (a redelivery is a duplicate), nothing applied
    assert all(x != x for x in b.values)
    assert c.values[USER_ACTIVITY.feature_names.index("clicks_1h")] == 1
