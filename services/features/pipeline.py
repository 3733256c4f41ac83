"""The feature use case: a batch of stream events -> offline rows, then online state.

Order of effects, for exactly-once results:
0. the fence: this worker still holds the partition's lease (read from the server), and
   the stored position is still this pipeline's (no other writer applied past it), so
   rows computed from stale states never go out (a worker paused past its lease
   published such rows before: an event counted twice in the warehouse);
1. per-event feature values -> the FEATURES stream (ids from the batch's sequences; the
   warehouse drains them into ReplacingMergeTree, where a replayed row collapses), and
   late events -> the LATE stream;
2. entity states + online vectors + the view position -> Redis in one transaction
   (guarded by the position);
3. only then is the batch acked (by the caller).
A crash between any two steps replays the batch with the same outcome. Raw history is
not this pipeline's: the warehouse drains EVENTS itself.

Failures, by whose fault they are:
- a message or event that cannot be read (not a list of events, no contract for its
  type and version, a payload its contract refuses) is the *input's*: it is dead-lettered
  (before the batch commits) and skipped; the rest of the batch flows;
- an error in the window computation is the *view's* (its code or definition): it raises
  :class:`ViewFailed`, and that version stops (other versions and views keep flowing);
- anything else (Redis, NATS) is retried by the consumer with the whole batch.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import msgspec

from myelin.contracts import ContractRegistry, StreamEvent
from myelin.errors import BAD_INPUT, Poison
from myelin.records import FeatureRow
from services.features.feature_rows import RowsSink
from services.features.logic import EntityState, Outcome, WindowEngine
from services.features.online_store import OnlineUpdate, StateStore

log = logging.getLogger(__name__)
_decode_events = msgspec.msgpack.Decoder(list[StreamEvent])
# Every event gets an ``event_seq`` = stream sequence x SEQ_STRIDE + its index in the message
# (a message carries up to 100 events): the unit of the per-entity apply-once guard.
SEQ_STRIDE = 1000
SWEEP_EVERY_S = 30.0  # how often expired entities are deleted from the online store


class ViewFailed(Poison):
    """The view's computation raised: the definition or its generated code cannot handle an
    event. Retrying cannot help; the version stops with this error."""

    code = "view_failed"


@dataclass(frozen=True, slots=True)
class BadEvent:
    """An EVENTS message (``index`` -1) or one event of it that cannot be read."""

    stream_seq: int
    index: int
    reason: str  # undecodable | unknown_contract | invalid_payload
    message: str
    event: StreamEvent | None
    payload: bytes


DeadLetters = Callable[[list[BadEvent]], Awaitable[None]]


@dataclass
class PipelineStats:
    events: int = 0
    messages: int = 0
    applied: int = 0
    duplicates: int = 0
    late: int = 0
    undecodable: int = 0
    feature_rows: int = 0
    position: int = 0
    last_event_ingest_ms: int = 0

    def add(self, other: PipelineStats) -> None:
        """Counts ``other`` in (positions are not summed: the caller sets its own)."""
        self.events += other.events
        self.messages += other.messages
        self.applied += other.applied
        self.duplicates += other.duplicates
        self.late += other.late
        self.undecodable += other.undecodable
        self.feature_rows += other.feature_rows
        self.last_event_ingest_ms = max(self.last_event_ingest_ms, other.last_event_ingest_ms)


class StateCache:
    """Hot entity states, bounded: the least recently *updated* go first (every state a
    batch touches is put back, so reads need no bookkeeping). Redis holds the durable
    copy."""

    def __init__(self, max_items: int) -> None:
        self.max_items = max_items
        self._items: dict[str, EntityState] = {}

    def get(self, entity: str) -> EntityState | None:
        return self._items.get(entity)

    def put(self, entity: str, st: EntityState) -> None:
        items = self._items
        items.pop(entity, None)
        items[entity] = st  # to the end: dicts keep insertion order
        while len(items) > self.max_items:
            del items[next(iter(items))]

    def clear(self) -> None:
        self._items.clear()


class FeaturePipeline:
    def __init__(
        self,
        engine: WindowEngine,
        registry: ContractRegistry,
        online: StateStore,
        rows_sink: RowsSink,
        cache_items: int = 200_000,
        reload_registry: Callable[[], Awaitable[ContractRegistry]] | None = None,
        late_sink: Callable[[str, list[tuple[int, StreamEvent]]], Awaitable[None]] | None = None,
        dead_letters: DeadLetters | None = None,
        fence: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """``fence``: raises when this process may no longer write this partition (a lease
        lost); called, with the position check, before a batch publishes anything."""
        self._fence = fence
        self._reload = reload_registry
        self._late_sink = late_sink
        self._dead_letters = dead_letters
        self.engine = engine
        self.view = engine.view
        self.registry = registry
        self.online = online
        self.rows_sink = rows_sink
        self.cache = StateCache(cache_items)
        self.stats = PipelineStats()
        self.watermarks: dict[int, int] = {}  # partition -> newest event time seen
        self._lateness_ms = self.view.allowed_lateness_s * 1000
        self._last_sweep = time.monotonic()
        self._stale = False  # re-read position and watermarks before the next batch
        # ingest time of the oldest event the last call committed (0: none): the batch's
        # freshness, publish -> visible online, is measured from it
        self.committed_oldest_ingest_ms = 0

    async def start(self) -> int:
        await self.online.register_view()
        self.stats.position = await self.online.position()
        self.watermarks = await self.online.watermarks()
        return self.stats.position

    async def process(self, batch: list[tuple[int, bytes]]) -> list[int]:
        """``batch`` is ``(stream_seq, payload)`` in stream order. Returns the sequences of
        the messages that could not be read at all (dead-lettered, skipped)."""
        self.committed_oldest_ingest_ms = 0
        if self._stale:  # after a failure: where the store stands (another worker may
            # have applied this partition meanwhile), so a retry computes from the same
            # state as whoever applied the rest
            self.stats.position = await self.online.position()
            self.watermarks = await self.online.watermarks()
            self._stale = False
        batch = [(s, p) for s, p in batch if s > self.stats.position]
        if not batch:
            return []
        try:
            return await self._process(batch)
        except BaseException:
            self.cache.clear()  # the states in it may hold half a batch: reload from Redis
            self._stale = True
            raise

    async def _decode(
        self, batch: list[tuple[int, bytes]]
    ) -> tuple[list[tuple[int, StreamEvent, Any]], list[BadEvent], int]:
        """The view's events, decoded; what cannot be read; how many events in all."""
        decoded: list[tuple[int, StreamEvent, Any]] = []
        total = 0
        bad: list[BadEvent] = []
        get = self.registry.get
        sources = self.view.sources
        reloaded = False
        for stream_seq, payload in batch:
            try:
                events = _decode_events.decode(payload)
                if len(events) > SEQ_STRIDE:
                    raise msgspec.ValidationError(
                        f"{len(events)} events in one message; at most {SEQ_STRIDE}"
                    )
            except BAD_INPUT as exc:
                bad.append(
                    BadEvent(
                        stream_seq, -1, "undecodable", f"not a list of events: {exc}", None, payload
                    )
                )
                continue
            base = stream_seq * SEQ_STRIDE
            total += len(events)
            for idx, ev in enumerate(events):
                if ev.type not in sources:
                    continue  # another view's business (and its problem, if invalid)
                contract = get(ev.type, ev.schema_version)
                if contract is None and self._reload is not None and not reloaded:
                    self.registry = await self._reload()  # a version registered since start
                    get, reloaded = self.registry.get, True
                    contract = get(ev.type, ev.schema_version)
                if contract is None:
                    bad.append(
                        BadEvent(
                            stream_seq,
                            idx,
                            "unknown_contract",
                            f"no contract for {ev.type} v{ev.schema_version} in the registry",
                            ev,
                            bytes(ev.data),
                        )
                    )
                    continue
                try:
                    data = contract.msgpack_decoder.decode(ev.data)
                except BAD_INPUT as exc:
                    bad.append(
                        BadEvent(
                            stream_seq,
                            idx,
                            "invalid_payload",
                            f"{ev.type} v{ev.schema_version}: {exc}",
                            ev,
                            bytes(ev.data),
                        )
                    )
                    continue
                decoded.append((base + idx, ev, data))
        return decoded, bad, total

    async def _process(self, batch: list[tuple[int, bytes]]) -> list[int]:
        decoded, bad, total = await self._decode(batch)
        if bad:
            for b in bad:
                log.warning(
                    "%s: stream seq %d%s dead-lettered: %s",
                    self.view.ref,
                    b.stream_seq,
                    f" event {b.index}" if b.index >= 0 else "",
                    b.message,
                )
            if self._dead_letters is not None:
                await self._dead_letters(bad)  # stored before the batch commits

        # Load the states this batch needs that are not hot.
        cache = self.cache
        needed = list({ev.entity_id for _, ev, _ in decoded if cache.get(ev.entity_id) is None})
        loaded = await self.online.load_states(needed)
        work: dict[str, EntityState] = {}
        late_events: list[tuple[int, StreamEvent]] = []
        touched: dict[str, tuple[list[float], str]] = {}
        late_seqs: set[int] = set()
        fv_rows: list[FeatureRow] = []
        applied = dup = 0
        wms = dict(self.watermarks)
        engine = self.engine
        lateness = self._lateness_ms
        seq = 0
        try:
            for seq, ev, data in decoded:
                entity = ev.entity_id
                st = work.get(entity)
                if st is None:
                    # Mutated in place: if the batch fails, process() drops the whole cache and
                    # states are reloaded from Redis, which only ever holds committed batches.
                    hot = cache.get(entity)
                    st = hot if hot is not None else loaded.get(entity) or EntityState()
                    work[entity] = st
                p_wm = wms.get(ev.partition, 0)
                if ev.event_time < p_wm - lateness:
                    outcome = engine.mark_late(st, seq)
                else:
                    outcome = engine.apply(st, seq, ev.type, ev.event_time, data, ev.event_id)
                    if ev.event_time > p_wm:
                        wms[ev.partition] = ev.event_time
                if outcome == Outcome.APPLIED:
                    applied += 1
                    values = engine.values(st)
                    touched[entity] = (values, ev.trace_id)
                    fv_rows.append(FeatureRow(entity, st.watermark, seq, ev.trace_id, values))
                elif outcome == Outcome.LATE:
                    late_seqs.add(seq)
                    late_events.append((seq, ev))
                    touched[entity] = (engine.values(st), ev.trace_id)
                else:
                    dup += 1
        except Exception as exc:
            raise ViewFailed(
                f"view {self.view.ref} failed computing stream event {seq}: "
                f"{type(exc).__name__}: {exc}",
                view=self.view.ref,
                event_seq=seq,
            ) from exc

        # Before anything goes out: still ours, and nobody applied past our position (rows
        # computed from stale states must never reach the FEATURES stream)
        if self._fence is not None:
            await self._fence()
        await self.online.check_position(self.stats.position)
        if fv_rows:
            await self.rows_sink(self.view, fv_rows, batch[0][0], batch[-1][0])
        if late_events and self._late_sink is not None:
            await self._late_sink(self.view.name, late_events)  # stored before the batch commits
        last_seq = batch[-1][0]
        updates = [OnlineUpdate(e, work[e], vals, trace) for e, (vals, trace) in touched.items()]
        await self.online.apply(
            updates,
            last_seq,
            {p: w for p, w in wms.items() if w != self.watermarks.get(p)},
            self.stats.position,
        )
        self.watermarks = wms
        for e, st in work.items():
            cache.put(e, st)
        s = self.stats
        s.events += total
        s.messages += len(batch)
        s.applied += applied
        s.duplicates += dup
        s.late += len(late_seqs)
        s.undecodable += len(bad)
        s.feature_rows += len(fv_rows)
        s.position = last_seq
        if decoded:
            s.last_event_ingest_ms = decoded[-1][1].ingest_time
            self.committed_oldest_ingest_ms = min(ev.ingest_time for _, ev, _ in decoded)
        now = time.monotonic()
        if now - self._last_sweep > SWEEP_EVERY_S:  # between batches: never races an apply
            self._last_sweep = now
            try:  # the batch is committed: a failed sweep is only tried again later
                await self.online.sweep(int(time.time() * 1000))
            except Exception as exc:  # noqa: BLE001
                log.warning("%s: TTL sweep failed (tried again later): %r", self.view.ref, exc)
        return [b.stream_seq for b in bad if b.index < 0]
