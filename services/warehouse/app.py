"""warehouse composition root: chdb (or a ClickHouse server), the stream drains, SQL."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
from aiohttp import web
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from myelin import bus, topology
from myelin.consume import PullLoop, ensure_consumer
from myelin.contracts.store import ContractStore
from myelin.dead_letters import consumer_dead_letters
from myelin.decisions import GovernanceClient
from myelin.errors import Poison
from myelin.pii import load_tokenizer
from myelin.settings import Settings
from myelin.subject_keys import SubjectKeys, erase_request_subject
from myelin.subjects import (
    AUDIT_STREAM,
    DLQ_STREAM,
    DRIFT_STREAM,
    EVENTS_STREAM,
    FEATURES_STREAM,
    INFERENCES_STREAM,
    LATE_STREAM,
    RPC_WAREHOUSE_ERASE,
    RPC_WAREHOUSE_REWIND,
)
from myelin.tasks import cancel_and_wait
from myelin.warehouse import open_warehouse
from services.warehouse.drains import (
    audit_drain,
    dlq_drain,
    drift_drain,
    events_drain,
    features_drain,
    inference_drain,
    late_drain,
)
from services.warehouse.erasure import erase_subject
from services.warehouse.http_interface import serve_clickhouse_http
from services.warehouse.retention import (
    RetentionReport,
    apply_retention,
    governed_retention,
    keep_applying,
)
from services.warehouse.sink import WarehouseSink
from services.warehouse.sql_api import serve_sql

log = logging.getLogger(__name__)
EVENTS_DRAIN = topology.WAREHOUSE_DRAINS[EVENTS_STREAM]
WAREHOUSE_NICENESS = 10


class RewindRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    from_seq: int = 1


class WarehouseApp:
    name = "warehouse"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._nc: NATS | None = None
        self._js: JetStreamContext | None = None
        self.sink: WarehouseSink | None = None
        self.loops: dict[str, PullLoop] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._subs: list[Any] = []
        self._handlers: dict[str, tuple[str, Callable[[list[Msg]], Awaitable[None]], int]] = {}
        self._http: web.AppRunner | None = None
        self.retention = RetentionReport()
        self._retention_task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        s = self.settings
        # The warm store can wait; online features cannot: under contention for the cores,
        # the scheduler should prefer the features service (raising one's own niceness
        # needs no privilege).
        os.nice(WAREHOUSE_NICENESS)
        self.sink = WarehouseSink(await asyncio.to_thread(open_warehouse, s))
        self._nc = await bus.connect(s, self.name)
        self._js = bus.jetstream(self._nc, s)
        decide = governed_retention(GovernanceClient(self._nc))
        self.retention = await apply_retention(self._js, self.sink, decide)
        if self.retention.unsettled:  # tried again until governance answers

            def keep(report: RetentionReport) -> None:
                self.retention = report

            self._retention_task = asyncio.create_task(
                keep_applying(self._js, self.sink, decide, self.retention, keep),
                name="retention",
            )
        # Each ClickHouse insert costs milliseconds and leaves a part to merge, whatever its
        # size: drains linger to insert at most about once a second per table.
        handlers = {
            EVENTS_STREAM: events_drain(self.sink),
            LATE_STREAM: late_drain(self.sink),
            FEATURES_STREAM: features_drain(self.sink),
            INFERENCES_STREAM: inference_drain(self.sink),
            AUDIT_STREAM: audit_drain(self.sink),
            DLQ_STREAM: dlq_drain(self.sink),
            DRIFT_STREAM: drift_drain(self.sink),
        }
        drains = [d for d in topology.durables(s) if d.owner == "warehouse"]
        self._handlers = {
            d.name: (d.stream, handlers[d.stream], topology.warehouse_batch(d.stream, s))
            for d in drains
        }
        for d in drains:
            durable = d.name
            # Resume right after the last acked batch: what a killed predecessor had fetched
            # but not stored comes again now, not after the ack wait (rows collapse anyway).
            try:
                info = await self._js.consumer_info(d.stream, durable)
                start: int | None = (info.ack_floor.stream_seq if info.ack_floor else 0) + 1
            except NotFoundError:
                start = None
            await ensure_consumer(
                self._js,
                d.stream,
                durable,
                d.filter_subject,
                max_ack_pending=d.max_ack_pending,
                ack_wait_s=d.ack_wait_s,
                start_seq=start,
            )
            self._start_loop(durable, stored=(start or 1) - 1)
        # personal data is revealed only to a PII read governance allows (pii_read.rego)
        keys = SubjectKeys(
            bus.jetstream(self._nc, s),
            load_tokenizer(s.pii_keys.get(), s.pii_active_kid, s.state_dir),
        )
        self._subs.append(await serve_sql(self._nc, self.sink, keys, GovernanceClient(self._nc)))
        if s.warehouse_http_port:
            self._http = await serve_clickhouse_http(self.sink, s.host, s.warehouse_http_port)
        self._subs.append(await self._serve_rewind())
        self._subs.append(await self._serve_erase())

    def _start_loop(self, durable: str, stored: int) -> None:
        """``stored``: the stream sequence this drain has stored up to (its position until
        it handles a batch)."""
        assert self._js is not None
        stream, handler, batch = self._handlers[durable]
        # A record that can never be stored is dead-lettered (the DLQ drain's own poison is
        # only logged and terminated: dead-lettering it would feed it back to itself).
        dead_letter = (
            None
            if stream == DLQ_STREAM
            else consumer_dead_letters(bus.Publisher(self._js, self.settings), durable)
        )
        loop = PullLoop(
            self._js,
            stream,
            durable,
            handler,
            batch=batch,
            linger_s=self.settings.warehouse_linger_s,
            dead_letter=dead_letter,
        )
        loop.position = stored
        self.loops[durable] = loop
        self._tasks[durable] = asyncio.create_task(loop.run(), name=durable)

    async def rewind_events(self, from_seq: int) -> int:
        """Re-drain EVENTS from ``from_seq`` (raw history lost or partial): idempotent, the
        rows collapse with any that survived. Returns the sequence it restarts at."""
        assert self._js is not None
        if from_seq < 1:
            raise Poison("from_seq starts at 1")
        loop = self.loops[EVENTS_DRAIN]
        loop.stop()
        await asyncio.gather(self._tasks[EVENTS_DRAIN], return_exceptions=True)
        d = topology.durable(EVENTS_DRAIN, self.settings)
        await ensure_consumer(
            self._js,
            d.stream,
            d.name,
            d.filter_subject,
            max_ack_pending=d.max_ack_pending,
            ack_wait_s=d.ack_wait_s,
            start_seq=from_seq,
        )
        self._start_loop(EVENTS_DRAIN, stored=from_seq - 1)
        log.info("raw history re-drains EVENTS from sequence %d", from_seq)
        return from_seq

    async def _serve_erase(self) -> Any:
        assert self._nc is not None

        async def handle(data: bytes, _headers: dict[str, str]) -> dict[str, Any]:
            subject = erase_request_subject(data)
            assert self.sink is not None and self._nc is not None
            registry = await ContractStore(bus.jetstream(self._nc, self.settings)).registry()
            key_fields = [c.key_field for c in registry]
            return {"deleted": await erase_subject(self.sink, subject, key_fields)}

        return await bus.serve(self._nc, RPC_WAREHOUSE_ERASE, handle)

    async def _serve_rewind(self) -> Any:
        assert self._nc is not None
        decode = msgspec.json.Decoder(RewindRequest)

        async def handle(data: bytes, _headers: dict[str, str]) -> dict[str, Any]:
            req = bus.decode_request(decode, data, "rewind")
            return {"from_seq": await self.rewind_events(req.from_seq)}

        return await bus.serve(self._nc, RPC_WAREHOUSE_REWIND, handle)

    async def stop(self) -> None:
        if self._retention_task is not None:
            await cancel_and_wait(self._retention_task)
            self._retention_task = None
        if self._http is not None:
            await self._http.cleanup()
            self._http = None
        for sub in self._subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        self._subs.clear()
        for loop in self.loops.values():
            loop.stop()
        if self._tasks:
            await asyncio.gather(*self._tasks.values(), return_exceptions=True)
            self._tasks.clear()
        if self._nc is not None:
            with contextlib.suppress(Exception):
                await self._nc.drain()
            self._nc = None
        if self.sink is not None:
            await asyncio.to_thread(self.sink.close)
            self.sink = None

    def status(self) -> dict[str, Any]:
        stuck = {n: loop.snapshot()["error"] for n, loop in self.loops.items() if not loop.healthy}
        return {
            # ready: every drain flows (none stuck retrying past its alert threshold)
            "ready": bool(self.loops) and not stuck,
            "not_ready": [f"{n}: {e}" for n, e in stuck.items()],
            "idle": all(loop.idle for loop in self.loops.values()),
            "dead_lettered": {n: loop.dead_lettered for n, loop in self.loops.items()},
            "retrying": {n: loop.attempts for n, loop in self.loops.items()},
            "drained": {name: loop.messages for name, loop in self.loops.items()},
            # stream sequence each drain has stored, and what was left behind it
            "positions": {name: loop.position for name, loop in self.loops.items()},
            "pending": {name: loop.pending for name, loop in self.loops.items()},
            "retention": self.retention.status(),
            "ts_ms": int(time.time() * 1000),
        }
