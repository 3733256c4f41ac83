"""Sustained overload: 20 producers demand ~20x the ingest in-flight window, 15 through the
SDK (NATS request-reply) and 5 over HTTP. Ingest pushes back (HTTP 429 with
``Retry-After``, NATS a typed ``overloaded``), its memory stays bounded, and every event
ends up stored exactly once."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import psutil
import pytest

from myelin import bus
from myelin.api_tokens import client_headers
from myelin.contracts import StreamEvent
from myelin.nats_identity import dev_seed_file
from myelin.sdk import Producer
from myelin.settings import Settings
from myelin.stack.supervisor import Stack
from myelin.subjects import EVENTS_STREAM, health_subject

pytestmark = pytest.mark.e2e
SDK_PRODUCERS, HTTP_PRODUCERS, PER_PRODUCER, BATCH = 15, 5, 5000, 500
PRODUCERS = SDK_PRODUCERS + HTTP_PRODUCERS
MAX_GROWTH_MB = 100


class PeakRss(threading.Thread):
    """Samples a process's RSS every 50 ms in its own thread (the test's event loop is busy
    producing, so a task would sample late) until stopped; keeps the peak."""

    def __init__(self, pid: int, interval_s: float = 0.05) -> None:
        super().__init__(name="peak-rss", daemon=True)
        self.proc = psutil.Process(pid)
        self.interval_s = interval_s
        self.start_rss = self.peak = int(self.proc.memory_info().rss)
        self.samples = 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self.interval_s):
            self.peak = max(self.peak, int(self.proc.memory_info().rss))
            self.samples += 1

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


def high_water_mark(pid: int) -> int | None:
    """The kernel's own peak RSS of the process (``VmHWM``), in bytes (Linux)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    kb = next((line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:")), "")
    return int(kb) * 1024 if kb else None


@dataclass
class HttpTally:
    accepted: int = 0
    duplicates: int = 0
    answers_429: int = 0
    answers_429_without_retry_after: int = 0


async def post_all(http: aiohttp.ClientSession, url: str, k: int, tally: HttpTally) -> None:
    """One HTTP producer: batches of BATCH events; on 429 it waits ``Retry-After`` seconds
    and resends the same batch (the ids make that idempotent)."""
    now = int(time.time() * 1000)
    for start in range(0, PER_PRODUCER, BATCH):
        body = json.dumps(
            [
                {
                    "event_id": f"h{k}-{i}",
                    "type": "click",
                    "schema_version": 1,
                    "event_time": now,
                    "producer_id": f"h{k}",
                    "data": {"user_id": f"u{i % 977}", "item_id": "i"},
                }
                for i in range(start, start + BATCH)
            ]
        ).encode()
        while True:
            async with http.post(url, data=body, headers={"Content-Type": "application/json"}) as r:
                answer: dict[str, Any] = await r.json()
                retry_after = r.headers.get("Retry-After")
            tally.accepted += answer.get("accepted", 0)  # a partial 429 stored some
            tally.duplicates += answer.get("duplicates", 0)
            if r.status != 429:
                assert (r.status, answer["rejected"]) == (200, 0), answer
                break
            tally.answers_429 += 1
            assert answer.get("error") == "overloaded" or answer["retry"] > 0, answer
            if retry_after is None:
                tally.answers_429_without_retry_after += 1
            await asyncio.sleep(float(retry_after or 1))


async def test_overload_pushes_back_with_bounded_memory_and_no_loss(settings: Settings) -> None:
    """Ingest under ~20x its in-flight window from both doors: HTTP producers get 429 with
    ``Retry-After`` (counted), SDK producers typed ``overloaded`` replies; the ingest
    process's RSS, sampled every 50 ms while the load runs, grows by less than
    MAX_GROWTH_MB (printed with ``-s``, with the kernel's high-water mark); every event of
    every producer is stored exactly once."""
    s = replace(settings, max_batch_events=BATCH, publish_window=64)  # in-flight limit: 512 events
    async with Stack(s, log=lambda _m: None, services=("ingest",)) as stack:
        pid = stack.procs["ingest"].pid
        assert pid is not None
        rss = PeakRss(pid)
        url = f"http://127.0.0.1:{s.ingest_http_port}/v1/events"
        tally = HttpTally()

        async def produce(k: int) -> Producer:
            async with Producer(
                s.nats_url,
                producer_id=f"p{k}",
                batch_size=BATCH,
                linger_s=0.01,
                nkey_file=dev_seed_file(s, "producer"),
            ) as p:
                for i in range(PER_PRODUCER):
                    await p.send(
                        "click", 1, {"user_id": f"u{i % 977}", "item_id": "i"}, event_id=f"p{k}-{i}"
                    )
            return p

        started = time.monotonic()
        rss.start()
        try:
            async with aiohttp.ClientSession(headers=client_headers(s)) as http:
                producers, _ = await asyncio.gather(
                    asyncio.gather(*(produce(k) for k in range(SDK_PRODUCERS))),
                    asyncio.gather(*(post_all(http, url, k, tally) for k in range(HTTP_PRODUCERS))),
                )
        finally:
            rss.stop()
        elapsed = time.monotonic() - started
        hwm = high_water_mark(pid)
        nc = await bus.connect(s, "test", identity="admin")
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
    growth_mb = (rss.peak - rss.start_rss) / 2**20
    print(
        f"\ningest peak RSS {rss.peak / 2**20:.0f} MB (start {rss.start_rss / 2**20:.0f} MB, "
        f"+{growth_mb:.0f} MB; {rss.samples} samples every 50 ms"
        + (f"; kernel high-water mark {hwm / 2**20:.0f} MB" if hwm else "")
        + f"), {tally.answers_429:,} HTTP answers 429 with Retry-After, "
        f"{sum(p.retries for p in producers):,} SDK retries, "
        f"{health['overloaded']:,} times overloaded; {PRODUCERS * PER_PRODUCER:,} events "
        f"in {elapsed:.1f} s"
    )
    assert health["overloaded"] > PRODUCERS  # it really was overloaded, and said so
    assert tally.answers_429 > 0 and tally.answers_429_without_retry_after == 0
    assert sum(p.retries for p in producers) > 0
    assert sum(p.accepted for p in producers) == SDK_PRODUCERS * PER_PRODUCER
    assert tally.accepted == HTTP_PRODUCERS * PER_PRODUCER
    assert not any(p.rejected for p in producers)
    assert len(ids) == len(set(ids)) == PRODUCERS * PER_PRODUCER  # nothing lost, nothing twice
    assert rss.samples >= elapsed / 0.05 / 2  # it really sampled all along
    assert growth_mb < MAX_GROWTH_MB, f"ingest RSS grew {growth_mb:.0f} MB under overload"
