"""The platform's streams and buckets on a real three-node JetStream cluster (three
nats-server processes routed on loopback, everything at replicas 3): the stream leader is
killed mid-stream and the publisher carries on through the others; nothing is lost and
nothing is doubled (message ids), and the registry keeps working."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from pathlib import Path

import pytest

from myelin import bus
from myelin.models import ModelRegistry
from myelin.settings import Settings
from myelin.stack.engines import NatsCluster
from myelin.stack.process import free_port
from myelin.subjects import EVENTS_STREAM, MODELS_BUCKET

pytestmark = pytest.mark.integration
N = 3000


async def _publish_all(pub: bus.Publisher, msgs: list[bus.OutMsg]) -> int:
    """Until every message is stored; returns how many attempts failed on the way."""
    failed = 0
    pending = msgs
    deadline = time.monotonic() + 60
    while pending:
        assert time.monotonic() < deadline, f"{len(pending)} messages never stored"
        results = await pub.publish_batch(pending)
        failed += sum(not r.ok for r in results)
        pending = [m for m, r in zip(pending, results, strict=True) if not r.ok]
        if pending:
            await asyncio.sleep(0.2)
    return failed


async def test_a_stream_leader_killed_mid_stream_loses_and_doubles_nothing(
    settings: Settings, tmp_path: Path
) -> None:
    ports = [free_port() for _ in range(6)]
    async with NatsCluster(tmp_path / "cluster", ports[:3], ports[3:]) as cluster:
        s = replace(settings, nats_url=cluster.url, stream_replicas=3, publish_timeout_s=2.0)
        nc = await bus.connect(s, "test")
        try:
            js = bus.jetstream(nc, s)
            deadline = time.monotonic() + 30
            while True:  # the cluster elects its meta leader first
                try:
                    await bus.provision(js, s)
                    break
                except Exception:
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.5)
            info = await js.stream_info(EVENTS_STREAM)
            assert info.config.num_replicas == 3 and info.cluster is not None
            assert len(info.cluster.replicas or []) == 2
            kv = await js.key_value(MODELS_BUCKET)
            assert (await kv.status()).stream_info.config.num_replicas == 3

            msgs = [
                bus.OutMsg(f"myelin.events.{i % 4}", f"event {i}".encode(), f"cluster-{i}")
                for i in range(N)
            ]
            pub = bus.Publisher(js, s)
            leader = info.cluster.leader
            victim = next(x for x in cluster.servers if f"n{cluster.servers.index(x)}" == leader)
            a_third_stored = asyncio.Event()

            async def producer() -> None:
                for at in range(0, N, 100):  # batches of 100, one after the other
                    await _publish_all(pub, msgs[at : at + 100])
                    if at + 100 >= N // 3:
                        a_third_stored.set()

            task = asyncio.create_task(producer())
            await a_third_stored.wait()
            victim.kill()  # kill -9 of the stream's leader while the producer goes on
            await task

            after = await js.stream_info(EVENTS_STREAM)
            assert after.state.messages == N  # nothing lost, nothing doubled
            assert after.cluster is not None and after.cluster.leader != leader
            # every message, read back by sequence from the surviving replicas
            seen = [
                (await js.get_msg(EVENTS_STREAM, seq)).data or b""
                for seq in range(after.state.first_seq, after.state.last_seq + 1)
            ]
            assert sorted(seen) == sorted(m.payload for m in msgs)

            # the registry (KV at replicas 3) still takes writes with one node down
            reg = ModelRegistry(nc, js)
            assert await reg.aliases("ctr") == {}
            await kv.put("ctr.aliases", b'{"champion": 1}')
            assert await reg.aliases("ctr") == {"champion": 1}
        finally:
            await nc.close()
