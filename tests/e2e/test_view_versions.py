"""A changed feature view runs beside the served one, backfills by replay, and is promoted
without a gap in serving; models stay pinned to the version they were trained on."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import grpc
import msgspec
import pytest

from myelin import bus, grpc_client, redis_users
from myelin.api_tokens import client_headers
from myelin.errors import RemoteError
from myelin.gen import myelin_predict_pb2 as mp
from myelin.gen import myelin_predict_pb2_grpc as mp_grpc
from myelin.online import OnlineReader, Status, UnknownView
from myelin.settings import Settings
from myelin.sql_client import wait_stored
from myelin.stack.supervisor import Stack
from myelin.subjects import (
    EVENTS_STREAM,
    FEATURES_STREAM,
    RPC_FEATURES_CHECK,
    RPC_FEATURES_VIEWS,
    RPC_WAREHOUSE_QUERY,
)
from services.features.views import USER_ACTIVITY, view_doc
from tests.helpers import clickstream, register, tiny_model

pytestmark = pytest.mark.e2e
OLD = USER_ACTIVITY.content_hash


def events(start: int, n: int, now: int) -> list[dict[str, Any]]:
    return clickstream(
        n, prefix="v", now_ms=now, users=37, items=5, ago_ms=600_000, step_ms=100, start=start
    )


async def views(nc: Any, **req: Any) -> dict[str, Any]:
    result: dict[str, Any] = msgspec.json.decode(
        await bus.request(nc, RPC_FEATURES_VIEWS, req, timeout=30)
    )
    return result


async def wait_caught_up(nc: Any, settings: Settings) -> dict[str, Any]:
    js = bus.jetstream(nc, settings)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        last = (await js.stream_info(EVENTS_STREAM)).state.last_seq
        listing = await views(nc, op="list")
        if all(v["position"] >= last for v in listing["versions"]):
            return listing
        await asyncio.sleep(0.1)
    raise AssertionError(f"feature view versions did not catch up: {listing}")


async def test_a_new_version_backfills_beside_the_served_one_and_is_promoted_without_a_gap(
    settings: Settings,
) -> None:
    import redis.asyncio as aioredis

    now = int(time.time() * 1000)
    doc = view_doc(USER_ACTIVITY)
    doc["features"] = [
        *doc["features"],
        {"name": "clicks_5m", "kind": "count", "window_s": 300, "source": "click"},
    ]
    users = [f"u{i}" for i in range(37)]
    async with (
        Stack(settings, log=lambda _m: None),
        aiohttp.ClientSession(headers=client_headers(settings)) as http,
    ):

        async def post(batch: list[dict[str, Any]]) -> None:
            async with http.post(
                f"http://127.0.0.1:{settings.ingest_http_port}/v1/events", json=batch
            ) as r:
                assert r.status == 200

        await post(events(0, 1500, now))
        nc = await bus.connect(settings, "test")
        r = aioredis.Redis.from_url(redis_users.client_url(settings, "admin"))
        try:
            listing = await wait_caught_up(nc, settings)
            assert [(v["version"], v["served"]) for v in listing["versions"]] == [(OLD, True)]
            # a model trained on the served version pins it in its provenance
            model_version = await register(nc, settings, tiny_model())

            bad = dict(
                doc, features=[{"name": "x", "kind": "sum", "window_s": 60, "source": "click"}]
            )
            with pytest.raises(RemoteError, match="a sum needs a field"):
                await views(nc, op="register", definition=bad)

            reg = await views(nc, op="register", definition=doc)
            new = reg["version"]
            assert reg["created"] and not reg["served"] and new != OLD
            assert (await views(nc, op="register", definition=doc))["created"] is False

            # only the operator changes what serves; a claimed requester counts for nothing
            retrainer = await bus.connect(settings, "test-retrainer", identity="retrainer")
            try:
                with pytest.raises(RemoteError, match="may not call") as refused:
                    await views(
                        retrainer, op="promote", view=f"user_activity@{new}", requester="operator"
                    )
                assert refused.value.code == "forbidden"
            finally:
                await retrainer.close()

            # the new version replays the stream from its start, beside the served one
            listing = await wait_caught_up(nc, settings)
            by_version = {v["version"]: v for v in listing["versions"]}
            assert by_version[new]["events"] == by_version[OLD]["events"] == 1500
            assert not by_version[new]["served"]

            # readers keep reading while the served pointer moves: never a gap
            reader = OnlineReader(r)
            seen: list[tuple[str, int, bool]] = []
            stop = asyncio.Event()

            async def read_forever() -> None:
                while not stop.is_set():
                    got = await reader.read("user_activity", users)
                    seen.append(
                        (
                            got[0].version,
                            len(got[0].values),
                            all(v.status == Status.FRESH for v in got),
                        )
                    )
                    await asyncio.sleep(0.002)

            task = asyncio.create_task(read_forever())
            await asyncio.sleep(0.2)
            promoted = await views(nc, op="promote", view=f"user_activity@{new}", requester="alice")
            assert promoted["previous"] == OLD and promoted["decision_id"]
            await post(events(1500, 300, now))
            await asyncio.sleep(0.3)
            stop.set()
            await task
            assert all(fresh for _, _, fresh in seen), "a read saw a missing or stale entity"
            versions_seen = [v for v, _, _ in seen]
            assert versions_seen[0] == OLD and versions_seen[-1] == new
            flip = versions_seen.index(new)
            assert set(versions_seen[:flip]) == {OLD} and set(versions_seen[flip:]) == {new}
            assert {n for v, n, _ in seen if v == new} == {14}

            listing = await wait_caught_up(nc, settings)
            assert {v["version"]: v["served"] for v in listing["versions"]} == {
                OLD: False,
                new: True,
            }
            # the pinned model still reads the version it was trained on
            async with grpc_client.channel(settings) as ch:
                stub = mp_grpc.PredictorStub(ch)
                resp = await stub.Predict(mp.PredictRequest(model_name="ctr", entity_ids=users[:3]))
                assert resp.feature_view_hash == OLD and resp.model_version == str(model_version)

                # offline: both versions hold a row per applied event, side by side
                js = bus.jetstream(nc, settings)
                await wait_stored(
                    nc,
                    events_seq=(await js.stream_info(EVENTS_STREAM)).state.last_seq,
                    features_seq=(await js.stream_info(FEATURES_STREAM)).state.last_seq,
                )
                rows = msgspec.json.decode(
                    await bus.request(
                        nc,
                        RPC_WAREHOUSE_QUERY,
                        {
                            "sql": "SELECT view_hash, count() AS n, "
                            "countIf(mapContains(values, 'clicks_5m')) AS with_new "
                            "FROM myelin.feature_values FINAL GROUP BY view_hash"
                        },
                    )
                )["data"]
                counts = {x["view_hash"]: (x["n"], x["with_new"]) for x in rows}
                assert counts == {OLD: (1800, 0), new: (1800, 1800)}
                check = msgspec.json.decode(
                    await bus.request(
                        nc,
                        RPC_FEATURES_CHECK,
                        {"sample": 20, "view": "user_activity"},
                        timeout=60,
                    )
                )
                assert check["checked"] == 20 and check["mismatches"] == []

                with pytest.raises(RemoteError, match="is the served version"):
                    await views(nc, op="retire", view=f"user_activity@{new}", requester="alice")
                await views(nc, op="retire", view=f"user_activity@{OLD}", requester="alice")
                assert [v["version"] for v in (await views(nc, op="list"))["versions"]] == [new]
                with pytest.raises(UnknownView):
                    await OnlineReader(r).read("user_activity", users, version=OLD)
                # a model pinned to a retired version is refused with the reason
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await stub.Predict(mp.PredictRequest(model_name="ctr", entity_ids=users[:3]))
                assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
                assert f"user_activity@{OLD}" in (err.value.details() or "")
        finally:
            await r.aclose()
            await nc.close()
