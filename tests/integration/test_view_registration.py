"""Registering a feature view: refused with every problem when it cannot run on the
registered contracts; a stored definition that no longer reads does not keep the service
from starting. The features service runs in process on real nats-server and redis-server."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import pytest
import redis.asyncio as aioredis
from nats.aio.client import Client as NATS

from myelin import bus, online
from myelin.errors import RemoteError
from myelin.records import AuditRecord
from myelin.settings import Settings
from myelin.subjects import RPC_FEATURES_VIEWS, VIEWS_BUCKET
from services.features.app import FeaturesApp
from services.features.views import USER_ACTIVITY, view_doc
from tests.helpers import stream_event

pytestmark = pytest.mark.integration


@pytest.fixture
async def features(
    nc: NATS, redis_client: aioredis.Redis, settings: Settings
) -> AsyncIterator[FeaturesApp]:
    app = FeaturesApp(settings)
    await app.start()
    try:
        yield app
    finally:
        await app.stop()


def definition(**changes: Any) -> dict[str, Any]:
    d = view_doc(USER_ACTIVITY)
    d["features"] = [dict(f) for f in d["features"]]
    d["name"] = "spend"
    d.update(changes)
    return d


async def register(nc: NATS, d: dict[str, Any]) -> dict[str, Any]:
    raw = await bus.request(nc, RPC_FEATURES_VIEWS, {"op": "register", "definition": d}, timeout=30)
    result: dict[str, Any] = msgspec.json.decode(raw)
    return result


async def test_a_view_that_cannot_run_is_refused_with_every_problem(
    features: FeaturesApp, nc: NATS
) -> None:
    d = definition()
    d["features"][7]["field"] = "amout"  # a misspelt field: AttributeError on main
    d["features"][9]["field"] = "currency"  # max over a string
    with pytest.raises(RemoteError) as err:
        await register(nc, d)
    assert err.value.code == "invalid_view"
    assert "spend_1h: no version of 'purchase' has a field 'amout'" in err.value.message
    assert "max_spend_1h: a max needs a numeric field; purchase.currency is string" in (
        err.value.message
    )
    with pytest.raises(RemoteError) as err:
        await register(nc, definition(bucket_s=0))  # ZeroDivisionError on main
    assert err.value.code == "invalid_view" and "bucket_s" in err.value.message
    listed = msgspec.json.decode(
        await bus.request(nc, RPC_FEATURES_VIEWS, {"op": "list"}, timeout=30)
    )
    assert [v["view"] for v in listed["versions"]] == ["user_activity"]  # nothing half-applied


async def test_a_ratio_of_a_later_ratio_runs(features: FeaturesApp, nc: NATS) -> None:
    d = definition()
    d["features"][2]["numerator"] = "ctr_1h"  # declared after it: NameError on main
    result = await register(nc, d)
    assert result["created"] and result["view"] == "spend"
    status = features.status()
    assert status["ready"] and not status["failed_versions"]
    [spend] = [v for v in status["versions"] if v["view"] == "spend"]
    assert spend["state"] == "ok"


async def test_a_stored_definition_that_no_longer_reads_is_reported_not_fatal(
    nc: NATS, redis_client: aioredis.Redis, settings: Settings
) -> None:
    js = bus.jetstream(nc, settings)
    kv = await bus.kv_bucket(js, VIEWS_BUCKET)
    await kv.put("broken.0123456789abcdef", msgspec.json.encode(definition(bucket_s=0)))
    app = FeaturesApp(settings)
    await app.start()  # on main: InvalidView, and the service could not start at all
    try:
        status = app.status()
        assert status["ready"]
        assert any(
            "broken.0123456789abcdef" in f and "bucket_s" in f for f in status["failed_versions"]
        )
    finally:
        await app.stop()


async def test_a_failed_served_version_can_be_retired_and_others_keep_flowing(
    features: FeaturesApp, nc: NATS, settings: Settings, redis_client: aioredis.Redis
) -> None:
    """On main the first version of a view was served at once and could never be retired,
    even when it could not run."""
    result = await register(nc, definition())  # "spend": its first version, served at once
    assert result["served"]
    assert features.views is not None
    runner = features.views.runners[result["version"]]

    def broken(*_args: Any) -> int:  # a stand-in for a bug in a view's code
        raise ZeroDivisionError("division by zero in the view's code")

    runner.engine.apply = broken  # type: ignore[method-assign,assignment]
    js = bus.jetstream(nc, settings)
    body = msgspec.msgpack.encode([stream_event("e1", "u1", int(time.time() * 1000))])
    await js.publish("myelin.events.0", body)
    served = f"user_activity@{USER_ACTIVITY.content_hash}"
    for _ in range(200):  # the failing version stops; the other one applies the event
        status = features.status()
        if status["failed_versions"] and status["version_events"].get(served):
            break
        await asyncio.sleep(0.05)
    ref = f"spend@{result['version']}"
    assert any(ref in f and "ZeroDivisionError" in f for f in status["failed_versions"])
    assert status["ready"]  # the other view flows: the service is degraded, not down
    assert status["version_failed"] == {ref: 1, USER_ACTIVITY.ref: 0}
    assert status["version_events"][served] == 1  # every version reports its own figures
    audit = await js.pull_subscribe("myelin.audit.view_failed", stream="MYELIN_AUDIT")
    [msg] = await audit.fetch(1, timeout=5)
    assert msgspec.msgpack.decode(msg.data, type=AuditRecord).subject == ref
    retired = msgspec.json.decode(
        await bus.request(
            nc,
            RPC_FEATURES_VIEWS,
            {"op": "retire", "view": ref, "requester": "ops"},
            timeout=30,
        )
    )
    assert retired["retired"]
    assert await redis_client.hget(online.view_key("spend"), "served") is None
