"""Replay the EVENTS stream into the offline store (ClickHouse), asking governance first.

- Raw history: the warehouse is asked to re-drain EVENTS from the first sequence.
- From sequence 1 (a *rebuild*) feature values too: they are recomputed with the same
  pipeline code as the live path, on states kept in memory, and published to the FEATURES
  stream like live rows, so every row is identical to the live one and collapses with it
  (ReplacingMergeTree): replaying twice, or over rows that survived, changes nothing. Use
  it after losing the warehouse.
- From a later sequence: raw history only (window states before that point are not
  known, and approximate feature rows would replace exact ones).
The replay is done when the warehouse has stored all of it. The online store (already
at the stream head) is never touched. One replay at a time; progress is in the features
status.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import msgspec
import nats.errors
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext, api

from myelin import bus
from myelin.contracts import ContractRegistry, StreamEvent
from myelin.decisions import GovernanceClient
from myelin.errors import MyelinError
from myelin.sql_client import stored_positions
from myelin.subjects import (
    EVENTS_STREAM,
    FEATURES_STREAM,
    RPC_WAREHOUSE_REWIND,
)
from myelin.tasks import cancel_and_wait
from services.features.feature_rows import RowsSink
from services.features.logic import WindowEngine
from services.features.online_store import MemoryStateStore
from services.features.pipeline import FeaturePipeline

log = logging.getLogger(__name__)
_events = msgspec.msgpack.Decoder(list[StreamEvent])


class ReplayError(MyelinError):
    code = "replay_error"


class ReplayDenied(MyelinError):
    code = "replay_denied"


class ReplayRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    requester: str = ""
    view: str = ""  # NAME@HASH, NAME (its served version) or '' (the primary view)
    from_seq: int = 1
    to_seq: int = 0  # 0: the stream's last sequence now
    # or a time range (ms since the epoch) of when events reached the stream; it is
    # resolved to sequences before governance is asked
    from_time_ms: int = 0
    to_time_ms: int = 0


class ReplayStatus(msgspec.Struct):
    state: str = "idle"  # idle | running | storing | done | failed
    mode: str = ""  # rebuild | raw
    from_seq: int = 0
    to_seq: int = 0
    messages_done: int = 0
    messages_total: int = 0
    events: int = 0
    decision_id: str = ""
    error: str = ""
    started_ms: int = 0
    finished_ms: int = 0


class Replayer:
    def __init__(
        self,
        nc: NATS,
        js: JetStreamContext,
        rows_sink: Callable[[str], RowsSink],
        registry: Callable[[], Awaitable[ContractRegistry]],
        governance: GovernanceClient,
        engines: Callable[[str], Awaitable[WindowEngine]],
        batch: int = 200,
        timeout_s: float = 3600.0,
    ) -> None:
        self._nc = nc
        self._js = js
        self._rows_sink = rows_sink  # by message id prefix
        self._timeout = timeout_s
        self._engines = engines
        self._registry = registry  # read when a replay starts, and again on an unknown version
        self._gov = governance
        self._batch = batch
        self.status = ReplayStatus()
        self._task: asyncio.Task[None] | None = None

    async def _event_times(self, seq: int) -> list[int]:
        msg = await self._js.get_msg(EVENTS_STREAM, seq=seq)
        return [e.event_time for e in _events.decode(msg.data or b"")]

    async def _seq_at(self, time_ms: int) -> int:
        """The first stream sequence stored at or after ``time_ms`` (0: none)."""
        cfg = api.ConsumerConfig(
            deliver_policy=api.DeliverPolicy.BY_START_TIME,
            opt_start_time=datetime.fromtimestamp(time_ms / 1000, tz=UTC),
            ack_policy=api.AckPolicy.NONE,
            inactive_threshold=10.0,
            filter_subject="myelin.events.>",
        )
        psub = await self._js.pull_subscribe("myelin.events.>", stream=EVENTS_STREAM, config=cfg)
        try:
            [msg] = await psub.fetch(1, timeout=2)
            return int(msg.metadata.sequence.stream)
        except (TimeoutError, nats.errors.TimeoutError):
            return 0
        finally:
            with contextlib.suppress(Exception):
                await psub.unsubscribe()

    async def _resolve_times(self, req: ReplayRequest, last_seq: int) -> ReplayRequest:
        if not req.from_time_ms and not req.to_time_ms:
            return req
        if req.to_time_ms and req.to_time_ms <= req.from_time_ms:
            raise ReplayError("the time range is empty: to_time must be after from_time")
        first = await self._seq_at(req.from_time_ms) if req.from_time_ms else req.from_seq
        if req.from_time_ms and not first:
            raise ReplayError("no events reached the stream at or after from_time")
        after = await self._seq_at(req.to_time_ms) if req.to_time_ms else 0
        last = after - 1 if after else last_seq
        return msgspec.structs.replace(
            req, from_seq=first, to_seq=last, from_time_ms=0, to_time_ms=0
        )

    async def start(self, req: ReplayRequest) -> ReplayStatus:
        if self._task is not None and not self._task.done():
            raise ReplayError("a replay is already running; wait for it (see `myelin status`)")
        info = await self._js.stream_info(EVENTS_STREAM)
        req = await self._resolve_times(req, info.state.last_seq)
        first, last = max(req.from_seq, info.state.first_seq), req.to_seq or info.state.last_seq
        if last < first or last > info.state.last_seq:
            raise ReplayError(
                f"no messages in [{req.from_seq}, {req.to_seq or 'last'}]; the stream holds "
                f"{info.state.first_seq}..{info.state.last_seq}"
            )
        engine = await self._engines(req.view)
        times = await self._event_times(first) + await self._event_times(last)
        days = (max(times) - min(times)) / 86_400_000 if times else 0.0
        mode = "rebuild" if first <= max(1, info.state.first_seq) else "raw"
        verdict = await self._gov.decide(
            "backfill",
            f"{engine.view.ref}:{first}-{last}",
            {
                "requester": req.requester,
                "view": engine.view.name,
                "version": engine.view.content_hash,
                "from_seq": first,
                "to_seq": last,
                "mode": mode,
                "range_days": round(days, 3),
            },
        )
        if not verdict.allow:
            raise ReplayDenied(
                "replay denied by policy: " + "; ".join(verdict.reasons),
                decision_id=verdict.decision_id,
            )
        self.status = ReplayStatus(
            state="running",
            mode=mode,
            from_seq=first,
            to_seq=last,
            messages_total=last - first + 1,
            decision_id=verdict.decision_id,
            started_ms=int(time.time() * 1000),
        )
        self._task = asyncio.create_task(self._run(engine, first, last, mode), name="replay")
        return self.status

    async def _run(self, engine: WindowEngine, first: int, last: int, mode: str) -> None:
        st = self.status
        try:
            await bus.request(self._nc, RPC_WAREHOUSE_REWIND, {"from_seq": first}, timeout=30)
            if mode == "rebuild":
                await self._recompute(engine, first, last)
            st.state = "storing"  # waiting for the warehouse to store everything
            features_last = (await self._js.stream_info(FEATURES_STREAM)).state.last_seq
            await self._wait_stored(last, features_last if mode == "rebuild" else 0)
            st.state = "done"
        except Exception as exc:
            log.exception("replay failed")
            st.state, st.error = "failed", f"{type(exc).__name__}: {exc}"
        finally:
            st.finished_ms = int(time.time() * 1000)

    async def _recompute(self, engine: WindowEngine, first: int, last: int) -> None:
        st = self.status
        # Contracts registered at run time are known here too (main read them once, when
        # the service started, and skipped later versions' events).
        pipeline = FeaturePipeline(
            engine,
            await self._registry(),
            MemoryStateStore(),
            self._rows_sink(f"replay-{st.decision_id[:12]}"),
            reload_registry=self._registry,
        )
        cfg = api.ConsumerConfig(
            deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=first,
            ack_policy=api.AckPolicy.NONE,
            inactive_threshold=60.0,
            filter_subject="myelin.events.>",
        )
        psub = await self._js.pull_subscribe("myelin.events.>", stream=EVENTS_STREAM, config=cfg)
        try:
            while st.messages_done < st.messages_total:
                msgs = await psub.fetch(self._batch, timeout=5)
                batch = [(m.metadata.sequence.stream, m.data) for m in msgs]
                batch = [(s, d) for s, d in batch if s <= last]
                if batch:
                    await pipeline.process(batch)
                st.messages_done = (
                    min(st.messages_total, max(s for s, _ in batch) - first + 1)
                    if batch
                    else st.messages_total
                )
                st.events = pipeline.stats.events
        finally:
            with contextlib.suppress(Exception):
                await psub.unsubscribe()

    async def _wait_stored(self, events_last: int, features_last: int) -> None:
        """Until the warehouse's drains are past what this replay needs stored."""
        st = self.status
        deadline = time.monotonic() + self._timeout
        while True:
            events, features = await stored_positions(self._nc)
            if st.mode == "raw":  # progress is the warehouse's
                st.messages_done = max(0, min(st.messages_total, events - st.from_seq + 1))
            if events >= events_last and features >= features_last:
                return
            if time.monotonic() > deadline:
                raise ReplayError(f"the warehouse did not store the replay in {self._timeout:.0f}s")
            await asyncio.sleep(0.1)

    async def stop(self) -> None:
        if self._task is not None:
            await cancel_and_wait(self._task)

    def snapshot(self) -> dict[str, Any]:
        result: dict[str, Any] = msgspec.to_builtins(self.status)
        return result
