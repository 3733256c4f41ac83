"""Lose the embedded warehouse, rebuild it by replay: identical rows, governance asked."""

from __future__ import annotations

import asyncio
import shutil
import time
from typing import Any

import aiohttp
import msgspec
import pytest

from myelin import bus, online, redis_users
from myelin.api_tokens import client_headers
from myelin.contracts.registry import default_registry
from myelin.contracts.schema import FieldSpec
from myelin.contracts.store import ContractStore
from myelin.errors import RemoteError
from myelin.settings import Settings
from myelin.stack.supervisor import Stack
from myelin.subjects import (
    RPC_FEATURES_CHECK,
    RPC_FEATURES_REPLAY,
    RPC_INGEST_PUBLISH,
    RPC_WAREHOUSE_QUERY,
    health_subject,
    partition_of,
)
from tests.helpers import clickstream, wait_caught_up

pytestmark = pytest.mark.e2e

FINGERPRINT = (
    "SELECT (SELECT count() FROM myelin.events FINAL) AS events, "
    "(SELECT count() FROM myelin.feature_values FINAL) AS fv, "
    "(SELECT sum(cityHash64(entity_id, as_of, stream_seq, toString(values))) FROM myelin.feature_values FINAL) AS h"
)


async def health(nc: Any) -> dict[str, Any]:
    result: dict[str, Any] = msgspec.json.decode(
        await bus.request(nc, health_subject("features"), {})
    )
    return result


async def fingerprint(nc: Any) -> dict[str, Any]:
    rows = msgspec.json.decode(await bus.request(nc, RPC_WAREHOUSE_QUERY, {"sql": FINGERPRINT}))[
        "data"
    ]
    return dict(rows[0])


async def test_rebuild_the_offline_store_by_replay(settings: Settings) -> None:
    now = int(time.time() * 1000)
    events = clickstream(
        4000,
        prefix="r",
        now_ms=now,
        users=41,
        items=7,
        ago_ms=1_200_000,
        step_ms=200,
        amount=lambda _i: 3.5,
    )
    async with Stack(settings, log=lambda _m: None) as stack:
        t_before = int(time.time() * 1000)
        async with aiohttp.ClientSession(headers=client_headers(settings)) as http:
            for i in range(0, 4000, 1000):
                async with http.post(
                    f"http://127.0.0.1:{settings.ingest_http_port}/v1/events",
                    json=events[i : i + 1000],
                ) as r:
                    assert r.status == 200
        nc = await bus.connect(settings, "test", identity="admin")
        try:
            # A contract version registered while the stack runs, and events of it: on main
            # the replay kept the registry it started with and skipped them.
            v2 = default_registry().get("purchase", 2)
            assert v2 is not None and v2.spec is not None
            coupon = FieldSpec("coupon", "string", required=False, default="")
            await ContractStore(bus.jetstream(nc, settings)).register(
                msgspec.structs.replace(v2.spec, version=3, fields=[*v2.spec.fields, coupon])
            )
            v3 = [
                {
                    "event_id": f"v3-{i}",
                    "type": "purchase",
                    "schema_version": 3,
                    "event_time": now - 60_000 + i,
                    "data": {"user_id": f"u{i}", "item_id": "i1", "amount": 2.0, "coupon": "X"},
                }
                for i in range(30)
            ]
            for _ in range(100):  # ingest picks the new version up within seconds
                res = msgspec.json.decode(await bus.request(nc, RPC_INGEST_PUBLISH, v3))
                if res["accepted"] + res["duplicates"] == 30:
                    break
                await asyncio.sleep(0.1)
            assert res["accepted"] + res["duplicates"] == 30, res
            t_after = int(time.time() * 1000) + 1
            last = await wait_caught_up(nc, settings)
            before = await fingerprint(nc)
            assert before["events"] == 4030 and before["fv"] == 4030
        finally:
            await nc.close()

        await stack.procs["warehouse"].stop()
        shutil.rmtree(settings.warehouse_dir)  # the warehouse is lost; Redis and the stream are not
        await stack.restart_service("warehouse")
        nc = await bus.connect(settings, "test", identity="admin")
        try:
            assert (await fingerprint(nc))["events"] == 0
            # a replay is the operator's: a producer's credential is refused, whatever it claims
            producer = await bus.connect(settings, "test-producer", identity="producer")
            try:
                with pytest.raises(RemoteError) as denied:
                    await bus.request(producer, RPC_FEATURES_REPLAY, {"requester": "operator"})
            finally:
                await producer.close()
            assert denied.value.code == "forbidden" and "producer" in denied.value.message
            for attempt in range(2):  # the second replay changes nothing
                started = msgspec.json.decode(
                    await bus.request(nc, RPC_FEATURES_REPLAY, {"requester": "ops"})
                )
                assert started["mode"] == "rebuild" and started["to_seq"] == last
                for _ in range(600):
                    st = (await health(nc))["replay"]
                    if st["state"] in ("done", "failed"):
                        break
                    await asyncio.sleep(0.1)
                assert st["state"] == "done", st
                assert st["events"] == 4030
                assert await fingerprint(nc) == before, f"replay {attempt}"
            # a time range (when events reached the stream) resolves to the same sequences
            started = msgspec.json.decode(
                await bus.request(
                    nc,
                    RPC_FEATURES_REPLAY,
                    {"requester": "ops", "from_time_ms": t_before, "to_time_ms": t_after},
                )
            )
            assert (started["from_seq"], started["to_seq"]) == (1, last)
            for _ in range(600):
                st = (await health(nc))["replay"]
                if st["state"] in ("done", "failed"):
                    break
                await asyncio.sleep(0.1)
            assert st["state"] == "done" and await fingerprint(nc) == before
            with pytest.raises(RemoteError, match="no events reached the stream"):
                await bus.request(
                    nc,
                    RPC_FEATURES_REPLAY,
                    {"requester": "ops", "from_time_ms": int(time.time() * 1000) + 3_600_000},
                )
            audit = msgspec.json.decode(
                await bus.request(
                    nc,
                    RPC_WAREHOUSE_QUERY,
                    {
                        "sql": "SELECT allow, count() AS n FROM myelin.audit FINAL WHERE action = 'backfill' "
                        "GROUP BY allow ORDER BY allow"
                    },
                )
            )["data"]
            # the denial and both replays are audited (drained from the AUDIT stream)
            assert {r["allow"]: r["n"] for r in audit}.get(1, 0) >= 1

            ok = msgspec.json.decode(
                await bus.request(nc, RPC_FEATURES_CHECK, {"sample": 50}, timeout=60)
            )
            assert ok["checked"] == 41 and ok["mismatches"] == [] and ok["matched"] == 41
            import redis

            rc = redis.Redis.from_url(redis_users.client_url(settings, "admin"))
            version = rc.hget(online.view_key("user_activity"), "served")
            assert isinstance(version, bytes)
            key = online.entities_key(
                "user_activity", version.decode(), partition_of("u7", settings.partitions)
            )
            names = rc.hget(online.version_key("user_activity", version.decode()), "features")
            assert isinstance(names, bytes)
            raw = rc.hget(key, "u7")
            assert isinstance(raw, bytes)
            doc = online.decode_entity(raw)
            doc.vec[names.decode().split(",").index("clicks_1h")] = 999.0  # a drifted online value
            state = msgspec.msgpack.decode(doc.state)
            rc.hset(key, "u7", online.encode_entity(doc.seq, doc.as_of, doc.trace, doc.vec, state))
            rc.close()
            bad = msgspec.json.decode(
                await bus.request(nc, RPC_FEATURES_CHECK, {"sample": 50}, timeout=60)
            )
            assert [(m["entity_id"], m["feature"], m["online"]) for m in bad["mismatches"]] == [
                ("u7", "clicks_1h", 999.0)
            ]
        finally:
            await nc.close()
