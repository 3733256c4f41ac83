"""The online/offline consistency check compares what it says it compares: the offline
recomputation follows the pipeline's rules (partition lateness, one effect per event id),
withheld (EXPIRED) vectors are not counted as matches, and an empty sample says so.
Real redis-server and chdb; the online side is written by the real pipeline."""

from __future__ import annotations

import time
from typing import Any

import msgspec
import pyarrow as pa
import pytest
import redis.asyncio as aioredis
from nats.aio.client import Client as NATS

from myelin import bus
from myelin.contracts import StreamEvent
from myelin.contracts.registry import default_registry
from myelin.online import OnlineReader
from myelin.settings import Settings
from myelin.warehouse import DATABASE, Warehouse
from services.features.consistency import CheckRequest, check
from services.features.feature_rows import rows_publisher
from services.features.logic import WindowEngine
from services.features.online_store import OnlineStore
from services.features.pipeline import FeaturePipeline
from services.features.views import USER_ACTIVITY
from services.warehouse.sink import events_table
from tests.helpers import stream_event

pytestmark = pytest.mark.integration
MIN = 60_000
_mp = msgspec.msgpack.Encoder()


def ev(event_id: str, user: str, t: int, partition: int = 0) -> StreamEvent:
    return stream_event(event_id, user, t, partition=partition)


async def run(
    events: list[StreamEvent],
    redis_client: aioredis.Redis,
    nc: NATS,
    settings: Settings,
    warehouse: Warehouse,
) -> dict[str, Any]:
    """One event per stream message, through the pipeline into Redis, and into raw history."""
    p = FeaturePipeline(
        WindowEngine(USER_ACTIVITY),
        default_registry(),
        OnlineStore(redis_client, USER_ACTIVITY, 3600),
        rows_publisher(bus.Publisher(bus.jetstream(nc, settings), settings)),
    )
    await p.start()
    await p.process([(seq, _mp.encode([e])) for seq, e in enumerate(events, start=1)])
    warehouse.insert_arrow(
        f"{DATABASE}.events",
        events_table([(seq * 1000, e) for seq, e in enumerate(events, start=1)]),
    )

    async def query(sql: str) -> pa.Table:
        return warehouse.query_arrow(sql)

    async def stored(_seq: int) -> None:
        return None

    return await check(
        CheckRequest(sample=100),
        WindowEngine(USER_ACTIVITY),
        default_registry(),
        OnlineReader(redis_client),
        query,
        stored,
    )


async def test_the_check_follows_the_pipelines_rules(
    redis_client: aioredis.Redis, nc: NATS, settings: Settings, warehouse: Warehouse
) -> None:
    now = int(time.time() * 1000)
    events = [
        ev("a1", "a", now),  # partition 0's watermark: now
        # b is new, but 62 minutes behind its partition: late for the pipeline (allowed
        # lateness 1 h). On main the offline recomputation applied it, and b2's hour holds
        # it: clicks_1h online 1, offline 2, a false mismatch.
        ev("b1", "b", now - 62 * MIN),
        ev("b2", "b", now - 5 * MIN),
        ev("a1", "a", now),  # the same event again (another batch): counted once
        ev("c1", "c", now - 25 * 3600_000, partition=1),  # past the view's TTL: EXPIRED
    ]
    result = await run(events, redis_client, nc, settings, warehouse)
    assert result["mismatches"] == []
    assert (result["sampled"], result["checked"], result["matched"]) == (3, 2, 2)
    assert result["expired_online"] == 1  # on main: counted as a match, values never compared


async def test_a_check_with_nothing_to_compare_says_so(
    redis_client: aioredis.Redis, nc: NATS, settings: Settings, warehouse: Warehouse
) -> None:
    result = await run([], redis_client, nc, settings, warehouse)
    assert (result["checked"], result["sampled"]) == (0, 0)
