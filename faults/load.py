"""A steady load through every ingest door, at least once: each batch is retried, with the
same event ids, until ingest has taken every event in it (accepted or duplicate).

Doors, in turn: the HTTP batch endpoint, the NATS request endpoint and the JetStream inbox
(``myelin.ingest.<producer>``). Events chosen by the workload are sent a second time a few
batches later, so they travel in another batch, through another door.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import msgspec
from nats.aio.client import Client as NATS

from faults.workload import Workload
from myelin import bus
from myelin.api_tokens import client_headers
from myelin.errors import MyelinError
from myelin.settings import Settings
from myelin.subjects import RPC_INGEST_PUBLISH, ingest_subject

log = logging.getLogger("faults.load")
DOORS = ("http", "nats", "inbox")
RESEND_LAG = 7  # a resent event rides with the batch this many batches later (another door)


@dataclass
class LoadStats:
    sent_batches: int = 0
    attempts: Counter[str] = field(default_factory=Counter)  # per door
    retries: Counter[str] = field(default_factory=Counter)  # per door: batch sent again
    errors: Counter[str] = field(default_factory=Counter)  # what made a retry necessary
    acked: Counter[str] = field(default_factory=Counter)  # event id -> times taken by ingest
    rejected: list[str] = field(default_factory=list)
    gave_up: list[str] = field(default_factory=list)  # event ids never taken
    started: float = 0.0
    finished: float = 0.0

    @property
    def events_acked(self) -> int:
        return sum(self.acked.values())


def batches(workload: Workload, size: int) -> list[list[dict[str, Any]]]:
    """The workload cut into batches; every ``resend_every``-th event also rides again
    ``RESEND_LAG`` batches later."""
    out = [workload.events[i : i + size] for i in range(0, len(workload.events), size)]
    if workload.resend_every:
        extra: dict[int, list[dict[str, Any]]] = {}
        for k, b in enumerate(out):
            again = [
                e for e in b if int(e["event_id"].rsplit("-", 1)[1]) % workload.resend_every == 0
            ]
            if again:
                extra.setdefault(min(k + RESEND_LAG, len(out) - 1), []).extend(again)
        out = [b + extra.get(k, []) for k, b in enumerate(out)]
    return out


class Load:
    def __init__(
        self,
        settings: Settings,
        workload: Workload,
        *,
        rate: float,
        batch: int = 100,
        in_flight: int = 6,
        deadline_s: float = 600.0,
        doors: tuple[str, ...] = DOORS,
    ) -> None:
        self.settings = settings
        self.workload = workload
        self.rate = rate
        self.batch = batch
        self.in_flight = in_flight
        self.deadline_s = deadline_s
        self.doors = doors
        self.stats = LoadStats()
        self._url = f"http://{settings.host}:{settings.ingest_http_port}/v1/events"

    async def run(self) -> LoadStats:
        st = self.stats
        st.started = time.monotonic()
        deadline = st.started + self.deadline_s
        # reconnects without limit; as a producer (its own inbox subject, its events)
        nc = await bus.connect(self.settings, "faults-load", identity="producer")
        sem = asyncio.Semaphore(self.in_flight)
        tasks: list[asyncio.Task[None]] = []
        try:
            async with aiohttp.ClientSession(headers=client_headers(self.settings)) as http:
                interval = self.batch / self.rate
                for k, b in enumerate(batches(self.workload, self.batch)):
                    await asyncio.sleep(max(0.0, st.started + k * interval - time.monotonic()))
                    await sem.acquire()
                    door = self.doors[k % len(self.doors)]
                    task = asyncio.create_task(self._deliver(k, door, b, http, nc, deadline))
                    task.add_done_callback(lambda _t: sem.release())
                    tasks.append(task)
                    st.sent_batches += 1
                await asyncio.gather(*tasks)
        finally:
            for t in tasks:
                t.cancel()
            await nc.close()
        st.finished = time.monotonic()
        return st

    async def _deliver(
        self,
        k: int,
        door: str,
        events: list[dict[str, Any]],
        http: aiohttp.ClientSession,
        nc: NATS,
        deadline: float,
    ) -> None:
        """Until ingest took every event of the batch (the same ids every time)."""
        st = self.stats
        pending = events
        delay = 0.1
        while pending:
            st.attempts[door] += 1
            try:
                pending = await self._send(door, pending, http, nc)
                if not pending:
                    return
                st.errors["partial: events to retry"] += 1
            except (aiohttp.ClientError, TimeoutError, MyelinError, OSError) as exc:
                st.errors[f"{door}: {type(exc).__name__}"] += 1
            st.retries[door] += 1
            if time.monotonic() + delay > deadline:
                st.gave_up += [e["event_id"] for e in pending]
                log.error("batch %d: %d events never taken by ingest", k, len(pending))
                return
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)

    async def _send(
        self, door: str, events: list[dict[str, Any]], http: aiohttp.ClientSession, nc: NATS
    ) -> list[dict[str, Any]]:
        """One attempt; returns the events still to send."""
        body = msgspec.json.encode(events)
        if door == "inbox":
            # stored in the inbox stream = taken (ingest validates it from there); the
            # message id makes a retried publish a no-op
            js = bus.jetstream(nc, self.settings)
            digest = hashlib.sha256(body).hexdigest()[:32]
            who = bus.identity_of(nc)
            await js.publish(
                ingest_subject("faults" if who == "anonymous" else who),
                body,
                timeout=5,
                headers={"Nats-Msg-Id": f"in:{digest}"},
            )
            self.stats.acked.update(e["event_id"] for e in events)
            return []
        if door == "http":
            async with http.post(
                self._url,
                data=body,
                headers={"Content-Type": "application/json"},
                timeout=aiohttp.ClientTimeout(total=40),
            ) as r:
                if r.status >= 500 or r.status in (408, 429) or r.status == 503:
                    self.stats.errors[f"http {r.status}"] += 1
                    return events
                result: dict[str, Any] = await r.json()
        else:
            raw = await bus.request(nc, RPC_INGEST_PUBLISH, body, timeout=40)
            result = msgspec.json.decode(raw)
        if "statuses" not in result:
            self.stats.errors[f"{door}: {result.get('error', 'no statuses')}"] += 1
            return events
        again = []
        for e, s in zip(events, result["statuses"], strict=True):
            if s in "ad":
                self.stats.acked[e["event_id"]] += 1
            elif s == "r":
                self.stats.rejected.append(e["event_id"])
            else:
                again.append(e)
        return again
