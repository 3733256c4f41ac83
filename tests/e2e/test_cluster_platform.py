"""The platform on a three-node JetStream cluster (every stream and bucket at replicas 3):
events flow through HTTP ingest, the features service and the warehouse while the EVENTS
stream's leader is killed (-9) mid-stream. Nothing is lost and nothing is doubled: the
features service applies every event once and the warehouse holds each once."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest

from myelin import bus
from myelin.settings import Settings
from myelin.stack.engines import NatsCluster
from myelin.stack.process import free_port
from myelin.stack.supervisor import Stack
from myelin.subjects import EVENTS_STREAM, health_subject
from tests.helpers import clickstream, offline_counts, wait_caught_up

pytestmark = pytest.mark.e2e
N = 12_000


async def post_until_stored(settings: Settings, batch: list[dict[str, Any]]) -> None:
    """A producer's retries: the same batch again until ingest stores it (a retried event
    comes back ``duplicate``, never stored twice)."""
    url = f"http://127.0.0.1:{settings.ingest_http_port}/v1/events"
    deadline = time.monotonic() + 60
    async with aiohttp.ClientSession() as http:
        while True:
            try:
                async with http.post(url, json=batch) as r:
                    if r.status == 200:
                        return
                    detail = await r.text()
            except aiohttp.ClientError as exc:
                detail = repr(exc)
            assert time.monotonic() < deadline, detail
            await asyncio.sleep(0.5)


async def wait_for_meta_leader(settings: Settings, timeout_s: float = 30.0) -> None:
    """Until the cluster answers JetStream requests (it elects a meta leader first)."""
    nc = await bus.connect(settings, "test-wait")
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                await bus.jetstream(nc, settings).account_info()
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.3)
    finally:
        await nc.close()


async def test_the_platform_keeps_flowing_when_the_events_leader_dies(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ports = [free_port() for _ in range(6)]
    async with NatsCluster(tmp_path / "cluster", ports[:3], ports[3:]) as cluster:
        # as an operator points the platform at a cluster: MYELIN_NATS_URL (no embedded
        # nats-server) and MYELIN_STREAM_REPLICAS
        monkeypatch.setenv("MYELIN_NATS_URL", cluster.url)
        s = replace(settings, nats_url=cluster.url, stream_replicas=3)
        await wait_for_meta_leader(s)
        events = clickstream(
            N,
            prefix="c",
            now_ms=int(time.time() * 1000),
            users=200,
            items=40,
            ago_ms=600_000,
            step_ms=40,
        )
        async with Stack(
            s, log=lambda _m: None, services=("governance", "warehouse", "features", "ingest")
        ):
            nc = await bus.connect(s, "test")
            try:
                js = bus.jetstream(nc, s)
                info = await js.stream_info(EVENTS_STREAM)
                assert info.config.num_replicas == 3 and info.cluster is not None
                leader = info.cluster.leader
                for at in range(0, N, 1000):
                    if at == N // 2:  # kill -9 of the EVENTS leader, half way through
                        next(x for i, x in enumerate(cluster.servers) if f"n{i}" == leader).kill()
                    await post_until_stored(s, events[at : at + 1000])
                await wait_caught_up(nc, s, timeout=120)
                after = await js.stream_info(EVENTS_STREAM)
                assert after.cluster is not None and after.cluster.leader != leader
                health: dict[str, Any] = msgspec.json.decode(
                    await bus.request(nc, health_subject("features"), {})
                )
                counts = {k: health[k] for k in ("events", "applied", "late", "duplicates")}
                counts["stream"] = int(after.state.messages)
                counts["offline"] = (await offline_counts(nc))["events"]
                # each event took effect once (a copy resent by a retry is recognised by its
                # event id) and is stored once
                assert counts["applied"] + counts["late"] == N, counts
                assert counts["offline"] == N, counts
            finally:
                await nc.close()
