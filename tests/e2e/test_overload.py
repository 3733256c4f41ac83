"""Sustained overload: 20 producers demand ~20x the ingest in-flight window. Ingest pushes
back (429 / typed ``overloaded``), its memory stays bounded, and every event ends up stored
exactly once."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import msgspec
import psutil
import pytest

from myelin import bus
from myelin.contracts import StreamEvent
from myelin.sdk import Producer
from myelin.settings import Settings
from myelin.stack.supervisor import Stack
from myelin.subjects import EVENTS_STREAM, health_subject

pytestmark = pytest.mark.e2e
PRODUCERS, PER_PRODUCER, BATCH = 20, 5000, 500


async def test_overload_pushes_back_with_bounded_memory_and_no_loss(settings: Settings) -> None:
    s = replace(settings, max_batch_events=BATCH, publish_window=64)  # in-flight limit: 512 events
    async with Stack(s, log=lambda _m: None, services=("ingest",)) as stack:
        proc = psutil.Process(stack.procs["ingest"].pid)
        baseline = proc.memory_info().rss
        peak = baseline
        done = asyncio.Event()

        async def sample() -> None:
            nonlocal peak
            while not done.is_set():
                peak = max(peak, proc.memory_info().rss)
                await asyncio.sleep(0.05)

        async def produce(k: int) -> Producer:
            async with Producer(
                s.nats_url, producer_id=f"p{k}", batch_size=BATCH, linger_s=0.01
            ) as p:
                for i in range(PER_PRODUCER):
                    await p.send(
                        "click", 1, {"user_id": f"u{i % 977}", "item_id": "i"}, event_id=f"p{k}-{i}"
                    )
            return p

        sampler = asyncio.create_task(sample())
        producers = await asyncio.gather(*(produce(k) for k in range(PRODUCERS)))
        done.set()
        await sampler
        nc = await bus.connect(s, "test")
        try:
            health = msgspec.json.decode(await bus.request(nc, health_subject("ingest"), {}))
            js = bus.jetstream(nc, s)
            n = (await js.stream_info(EVENTS_STREAM)).state.messages
            sub = await js.pull_subscribe("myelin.events.>", stream=EVENTS_STREAM)
            ids: list[str] = []
            while n > 0:
                msgs = await sub.fetch(min(n, 50), timeout=10)
                n -= len(msgs)
                for m in msgs:
                    ids += [
                        e.event_id for e in msgspec.msgpack.decode(m.data, type=list[StreamEvent])
                    ]
                    await m.ack()  # the reader's consumer stops delivering at 1000 unacked
        finally:
            await nc.close()
    assert health["overloaded"] > PRODUCERS  # it really was overloaded, and said so
    assert sum(p.retries for p in producers) > 0
    assert sum(p.accepted for p in producers) == PRODUCERS * PER_PRODUCER
    assert not any(p.rejected for p in producers)
    assert len(ids) == len(set(ids)) == PRODUCERS * PER_PRODUCER  # nothing lost, nothing twice
    growth_mb = (peak - baseline) / 2**20
    assert growth_mb < 100, f"ingest RSS grew {growth_mb:.0f} MB under overload"
