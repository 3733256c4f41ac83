"""The online store on a real Redis Cluster (three masters from the bundled redis-server,
slots assigned by the fixture): each partition's batch is one transaction on its slot, a
read of entities from every partition is answered across the nodes, and the vectors equal
those the same events give on a single Redis node."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import pytest
import redis.asyncio as aioredis
from nats.aio.client import Client as NATS

from myelin import bus, online
from myelin.contracts import default_registry
from myelin.online import EntityVector, OnlineReader
from myelin.settings import Settings
from myelin.stack.engines import RedisCluster, redis_cluster_ports
from myelin.subjects import partition_of
from services.features.feature_rows import rows_publisher
from services.features.logic import WindowEngine
from services.features.online_store import ConcurrentWriter, OnlineStore
from services.features.pipeline import FeaturePipeline
from services.features.progress import stored_positions
from services.features.views import USER_ACTIVITY
from tests.helpers import stream_event

pytestmark = pytest.mark.integration
PARTITIONS = 8
USERS = [f"u{i}" for i in range(40)]


@pytest.fixture
async def cluster_client(tmp_path: Path) -> AsyncIterator[tuple[aioredis.Redis, RedisCluster]]:
    async with RedisCluster(tmp_path / "rc", redis_cluster_ports(3)) as rc:
        client = online.connect(rc.url, cluster=True)
        try:
            yield client, rc
        finally:
            await client.aclose()


def batches(now: int) -> dict[int, list[tuple[int, bytes]]]:
    """Per partition, stream messages (seq, payload) of that partition's users' events,
    numbered as one stream: the partitions interleave."""
    out: dict[int, list[tuple[int, bytes]]] = {}
    for k in range(400):
        seq = k + 1
        user = USERS[k % len(USERS)]
        p = partition_of(user, PARTITIONS)
        ev = stream_event(
            f"e{k}", user, now - 30_000 + k, typ="click" if k % 3 else "impression", partition=p
        )
        out.setdefault(p, []).append((seq, msgspec.msgpack.encode([ev])))
    return out


def _comparable(v: EntityVector) -> tuple[object, ...]:
    return (v.entity_id, v.seq, v.as_of_ms, *(None if x != x else x for x in v.values))


async def apply_all(
    client: aioredis.Redis, nc: NATS, settings: Settings, now: int
) -> list[EntityVector]:
    sink = rows_publisher(bus.Publisher(bus.jetstream(nc, settings), settings))
    for p, msgs in batches(now).items():
        store = OnlineStore(client, USER_ACTIVITY, 3600, p, PARTITIONS)
        pipe = FeaturePipeline(WindowEngine(USER_ACTIVITY), default_registry(), store, sink)
        await pipe.start()
        half = len(msgs) // 2
        await pipe.process(msgs[:half])
        await pipe.process(msgs[half:])
    return await OnlineReader(client).read("user_activity", USERS, now_ms=now)


async def test_the_online_store_on_a_redis_cluster_equals_one_node(
    cluster_client: tuple[aioredis.Redis, RedisCluster],
    redis_client: aioredis.Redis,
    nc: NATS,
    settings: Settings,
) -> None:
    client, rc = cluster_client
    now = int(time.time() * 1000)
    on_cluster = await apply_all(client, nc, settings, now)
    on_one_node = await apply_all(redis_client, nc, settings, now)
    assert [_comparable(v) for v in on_cluster] == [_comparable(v) for v in on_one_node]
    assert all(v.status == "FRESH" for v in on_cluster)
    assert sum(v.values[USER_ACTIVITY.feature_names.index("clicks_1h")] for v in on_cluster) > 0

    # the partitions are spread over the three nodes: each holds some entities hashes
    version = USER_ACTIVITY.content_hash
    per_node = []
    for server in rc.servers:
        node = aioredis.Redis(host=rc.host, port=server.port)
        try:
            per_node.append(len(await node.keys("myelin:v4:entities:*")))
        finally:
            await node.aclose()
    assert sum(per_node) == PARTITIONS and all(per_node)

    # positions read across the nodes; a stale writer is refused on its slot
    positions = await stored_positions(client, "user_activity", version, PARTITIONS)
    assert all(pos > 0 for pos in positions)
    store = OnlineStore(client, USER_ACTIVITY, 3600, 0, PARTITIONS)
    with pytest.raises(ConcurrentWriter, match="another worker applied it"):
        await store.apply([], positions[0] + 10, {}, after=positions[0] - 1)

    # the served pointer swaps on its node
    assert await store.promote() == version
    assert await store.served() == version
