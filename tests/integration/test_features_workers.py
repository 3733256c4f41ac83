"""Two features workers in one stack (real nats-server and redis-server): they split the
partitions, together apply every event once, a version registered through either is run
by both, and a retired version leaves no key behind in Redis whichever worker wrote last."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from typing import Any

import msgspec
import pytest
import redis.asyncio as aioredis
from nats.aio.client import Client as NATS

from myelin import bus
from myelin.online import OnlineReader
from myelin.settings import Settings
from myelin.subjects import EVENTS_STREAM, RPC_FEATURES_VIEWS, partition_of
from services.features.app import FeaturesApp
from services.features.views import USER_ACTIVITY, view_doc
from tests.helpers import stream_event

pytestmark = pytest.mark.integration
USERS = [f"u{i}" for i in range(64)]


@pytest.fixture
async def two_workers(
    nc: NATS, redis_client: aioredis.Redis, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[FeaturesApp, FeaturesApp]]:
    s = replace(settings, features_workers=2)
    apps = []
    for name in ("w1", "w2"):
        monkeypatch.setenv("MYELIN_FEATURES_WORKER", name)
        app = FeaturesApp(s)
        await app.start()
        apps.append(app)
    try:
        yield apps[0], apps[1]
    finally:
        for app in apps:
            await app.stop()


async def until(check: Callable[[], Any], what: str, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not await check():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.1)


async def views(nc: NATS, **req: Any) -> dict[str, Any]:
    result: dict[str, Any] = msgspec.json.decode(
        await bus.request(nc, RPC_FEATURES_VIEWS, req, timeout=30)
    )
    return result


async def test_two_workers_split_the_partitions_and_share_the_versions(
    two_workers: tuple[FeaturesApp, FeaturesApp],
    nc: NATS,
    redis_client: aioredis.Redis,
    settings: Settings,
) -> None:
    a, b = two_workers

    async def split() -> bool:
        owned = [a.owned_partitions(), b.owned_partitions()]
        return sorted(owned[0] + owned[1]) == list(range(settings.partitions)) and all(owned)

    await until(split, "the two workers did not split the partitions")

    js = bus.jetstream(nc, settings)
    now = int(time.time() * 1000)
    for k in range(640):
        user = USERS[k % len(USERS)]
        ev = stream_event(f"e{k}", user, now - 60_000 + k, partition=partition_of(user, 8))
        await js.publish(f"myelin.events.{ev.partition}", msgspec.msgpack.encode([ev]))
    last = (await js.stream_info(EVENTS_STREAM)).state.last_seq

    async def applied() -> bool:
        return bool(a.status()["position"] >= last and b.status()["position"] >= last)

    await until(applied, "the workers did not apply the stream")
    assert a.status()["events"] + b.status()["events"] == 640  # each event once
    assert a.status()["events"] and b.status()["events"]  # by both
    got = await OnlineReader(redis_client).read("user_activity", USERS)
    clicks = USER_ACTIVITY.feature_names.index("clicks_1h")
    assert [v.values[clicks] for v in got] == [10.0] * len(USERS)

    # a new version of the view, registered through one worker, runs on both
    doc = view_doc(USER_ACTIVITY)
    doc["features"] = [
        *doc["features"],
        {"name": "clicks_5m", "kind": "count", "window_s": 300, "source": "click"},
    ]
    reg = await views(nc, op="register", definition=doc)
    version = reg["version"]
    assert reg["created"] and not reg["served"]

    async def both_run() -> bool:
        assert a.views is not None and b.views is not None
        return version in a.views.runners and version in b.views.runners

    await until(both_run, "the new version did not run on both workers")

    async def spend_applied() -> bool:
        assert a.views is not None
        runner = a.views.runners.get(version)
        return runner is not None and runner.position >= last

    await until(spend_applied, "the new version did not backfill")
    assert await redis_client.keys(f"*user_activity:{version}:*")

    # retired through one worker while events flow: the other one applies the version's
    # batches until it learns of the retirement (it re-reads the registry every 2 s), and
    # writes keys back after the retiring worker dropped them; when it stops the version it
    # drops them too: nothing of the version stays in Redis
    flowing = asyncio.Event()

    async def keep_sending() -> None:
        k = 0
        while not flowing.is_set():
            user = USERS[k % len(USERS)]
            ev = stream_event(
                f"r{k}", user, int(time.time() * 1000), partition=partition_of(user, 8)
            )
            await js.publish(f"myelin.events.{ev.partition}", msgspec.msgpack.encode([ev]))
            k += 1
            await asyncio.sleep(0.005)

    sender = asyncio.create_task(keep_sending())
    await asyncio.sleep(0.3)
    await views(nc, op="retire", view=f"user_activity@{version}", requester="test")

    async def both_stopped() -> bool:
        assert a.views is not None and b.views is not None
        return version not in a.views.runners and version not in b.views.runners

    await until(both_stopped, "the retired version kept running")
    flowing.set()
    await sender
    await asyncio.sleep(0.5)  # anything still in flight anywhere has landed by now
    assert await redis_client.keys(f"*user_activity:{version}*") == []
