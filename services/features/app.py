"""features composition root.

Owns: the warehouse (chdb when no ClickHouse server is configured), the EVENTS pull
consumer feeding the feature pipeline, and the drains of INFERENCES, AUDIT and DLQ.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import msgspec
import redis.asyncio as aioredis
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from myelin import bus, telemetry
from myelin.consume import PullLoop, ensure_consumer
from myelin.contracts.store import ContractStore
from myelin.decisions import GovernanceClient
from myelin.errors import Poison
from myelin.online import OnlineReader
from myelin.settings import Settings
from myelin.subjects import (
    AUDIT_STREAM,
    DLQ_STREAM,
    EVENTS_STREAM,
    INFERENCES_STREAM,
    RPC_FEATURES_CHECK,
    RPC_FEATURES_REPLAY,
)
from myelin.warehouse import open_warehouse
from services.features.consistency import CheckRequest, check
from services.features.drains import audit_drain, dlq_drain, inference_drain
from services.features.late_sink import late_publisher
from services.features.logic import WindowEngine
from services.features.online_store import OnlineStore
from services.features.pipeline import FeaturePipeline
from services.features.replay import Replayer, ReplayRequest
from services.features.sql_api import serve_sql
from services.features.views import USER_ACTIVITY
from services.features.warehouse_sink import WarehouseSink

log = logging.getLogger(__name__)


async def serve_replay(nc: NATS, replayer: Replayer) -> Any:
    """Inbound adapter: start a replay (``myelin features replay``); progress is in the status."""
    decode = msgspec.json.Decoder(ReplayRequest)

    async def handle(data: bytes, _headers: dict[str, str]) -> dict[str, Any]:
        try:
            req = decode.decode(data)
        except msgspec.MsgspecError as exc:
            raise Poison(f"bad replay request: {exc}") from None
        await replayer.start(req)
        return replayer.snapshot()

    return await bus.serve(nc, RPC_FEATURES_REPLAY, handle)


async def serve_check(nc: NATS, app: FeaturesApp) -> Any:
    """Inbound adapter: the online/offline consistency check (``myelin features check``)."""
    decode = msgspec.json.Decoder(CheckRequest)

    async def handle(data: bytes, _headers: dict[str, str]) -> dict[str, Any]:
        try:
            req = decode.decode(data or b"{}")
        except msgspec.MsgspecError as exc:
            raise Poison(f"bad check request: {exc}") from None
        assert app.pipeline is not None and app.sink is not None and app.reader is not None
        # the engine holds configuration only (no entity state): the live one is reused
        return await check(req, app.pipeline.engine, app.pipeline.registry, app.reader, app.sink)

    return await bus.serve(nc, RPC_FEATURES_CHECK, handle)


class FeaturesApp:
    name = "features"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._nc: NATS | None = None
        self._redis: aioredis.Redis | None = None
        self.sink: WarehouseSink | None = None
        self.pipeline: FeaturePipeline | None = None
        self.loops: list[PullLoop] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._subs: list[Any] = []
        self.replayer: Replayer | None = None
        self.reader: OnlineReader | None = None

    async def start(self) -> None:
        s = self.settings
        self.sink = WarehouseSink(await asyncio.to_thread(open_warehouse, s))
        self._redis = aioredis.Redis.from_url(s.redis_url)
        await self._redis.ping()
        self._nc = await bus.connect(s, self.name)
        js = bus.jetstream(self._nc, s)
        view = USER_ACTIVITY
        contracts = ContractStore(js)
        self.pipeline = FeaturePipeline(
            WindowEngine(view),
            await contracts.registry(),
            OnlineStore(self._redis, view, s.online_ttl_s),
            self.sink,
            reload_registry=contracts.registry,
            late_sink=late_publisher(bus.Publisher(js, s)),
        )
        position = await self.pipeline.start()
        durable = f"features-{view.name}"
        # Redis holds the committed position; the consumer is re-created to start right after it.
        await ensure_consumer(
            js,
            EVENTS_STREAM,
            durable,
            "myelin.events.>",
            max_ack_pending=s.features_batch * 2,
            ack_wait_s=s.features_ack_wait_s,
            start_seq=position + 1,
        )
        log.info(
            "view %s (%s) resumes after stream sequence %d", view.name, view.content_hash, position
        )
        self.loops.append(
            PullLoop(js, EVENTS_STREAM, durable, self._on_events, batch=s.features_batch)
        )
        for stream, name, handler in (
            (INFERENCES_STREAM, "warehouse-inferences", inference_drain(self.sink)),
            (AUDIT_STREAM, "warehouse-audit", audit_drain(self.sink)),
            (DLQ_STREAM, "warehouse-dlq", dlq_drain(self.sink)),
        ):
            await ensure_consumer(js, stream, name, ">", max_ack_pending=10_000, ack_wait_s=30.0)
            self.loops.append(PullLoop(js, stream, name, handler, batch=1000))
        self._tasks = [asyncio.create_task(loop.run(), name=loop.durable) for loop in self.loops]
        self._subs.append(await serve_sql(self._nc, self.sink))
        self.replayer = Replayer(
            js,
            self.sink,
            WindowEngine(view),
            self.pipeline.registry,
            GovernanceClient(self._nc),
            batch=s.features_batch,
        )
        self._subs.append(await serve_replay(self._nc, self.replayer))
        self.reader = OnlineReader(self._redis)
        self._subs.append(await serve_check(self._nc, self))

    async def _on_events(self, msgs: list[Msg]) -> None:
        assert self.pipeline is not None
        first = msgs[0]
        ctx = telemetry.extract(dict(first.headers or {}))
        with telemetry.tracer("myelin.features").start_as_current_span(
            "features batch", context=ctx, attributes={"messaging.batch.message_count": len(msgs)}
        ):
            await self.pipeline.process([(m.metadata.sequence.stream, m.data) for m in msgs])

    async def stop(self) -> None:
        # Stop intake (queries, then consumers), let in-flight batches finish, close sinks.
        for sub in self._subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        self._subs.clear()
        if self.replayer is not None:
            await self.replayer.stop()
        for loop in self.loops:
            loop.stop()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
            self._tasks.clear()
        if self._nc is not None:
            with contextlib.suppress(Exception):
                await self._nc.drain()
            self._nc = None
        if self.sink is not None:
            await asyncio.to_thread(self.sink.close)
            self.sink = None
        if self._redis is not None:
            await self._redis.aclose()
            self._redis = None

    def status(self) -> dict[str, Any]:
        p = self.pipeline
        st = p.stats if p else None
        return {
            "view": p.view.name if p else "",
            "view_hash": p.view.content_hash if p else "",
            "position": st.position if st else 0,
            "events": st.events if st else 0,
            "applied": st.applied if st else 0,
            "duplicates": st.duplicates if st else 0,
            "late": st.late if st else 0,
            "undecodable": st.undecodable if st else 0,
            "feature_rows": st.feature_rows if st else 0,
            "idle": all(loop.idle for loop in self.loops),
            "drained": {loop.durable: loop.messages for loop in self.loops},
            "replay": self.replayer.snapshot() if self.replayer else {},
            "ts_ms": int(time.time() * 1000),
        }
