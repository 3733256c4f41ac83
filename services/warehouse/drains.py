"""Inbound adapters: the EVENTS, LATE, FEATURES, INFERENCES, AUDIT, DLQ and DRIFT streams
drained into ClickHouse.

Idempotent: rows are keyed on ids carried by the records, in ReplacingMergeTree tables,
and a batch is acked only after its insert returned.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

import msgspec
from nats.aio.msg import Msg

from myelin.consume import PoisonMessages
from myelin.contracts import StreamEvent
from myelin.errors import BAD_INPUT
from myelin.records import (
    AuditRecord,
    DeadLetter,
    DriftDetected,
    FeatureRows,
    InferenceRecord,
    LateEvents,
)
from services.warehouse.sink import (
    WarehouseSink,
    audit_table,
    dead_letters_table,
    drift_table,
    events_table,
    feature_values_table,
    inferences_table,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

_inf = msgspec.msgpack.Decoder(list[InferenceRecord])  # the recorder publishes batches
_aud = msgspec.msgpack.Decoder(AuditRecord)
_dlq = msgspec.msgpack.Decoder(DeadLetter)
_drift = msgspec.msgpack.Decoder(DriftDetected)
_events = msgspec.msgpack.Decoder(list[StreamEvent])
_rows = msgspec.msgpack.Decoder(FeatureRows)
_late = msgspec.msgpack.Decoder(LateEvents)
SEQ_STRIDE = 1000  # event seq = stream sequence x 1000 + index in the message
SEQS_HEADER = "Myelin-Event-Seqs"  # on LATE messages: the events' sequences, comma-separated


class Undecodable(ValueError):
    """One message is not what its stream carries."""


_UNDECODABLE: tuple[type[Exception], ...] = (*BAD_INPUT, Undecodable)


def _decoded(m: Msg, decode: Callable[[Msg], T]) -> T:
    try:
        return decode(m)
    except _UNDECODABLE as exc:
        raise PoisonMessages(
            f"{m.subject} (stream seq {m.metadata.sequence.stream}) is not a valid record: {exc}",
            [m],
        ) from None


def _decode_all(msgs: list[Msg], dec: msgspec.msgpack.Decoder[T]) -> list[tuple[int, T]]:
    """Every message decoded; the ones that cannot be are named in one
    :class:`PoisonMessages` (dead-lettered by the loop, which then retries the rest)."""
    out: list[tuple[int, T]] = []
    bad: list[Msg] = []
    for m in msgs:
        try:
            out.append((m.metadata.sequence.stream, dec.decode(m.data)))
        except BAD_INPUT as exc:
            log.warning("undecodable record on %s: %s", m.subject, exc)
            bad.append(m)
    if bad:
        raise PoisonMessages(f"{len(bad)} undecodable record(s) on {bad[0].subject}", bad)
    return out


def inference_drain(sink: WarehouseSink) -> Callable[[list[Msg]], Awaitable[None]]:
    async def handle(msgs: list[Msg]) -> None:
        recs = [r for _, group in _decode_all(msgs, _inf) for r in group]
        await sink.insert("inferences", inferences_table(recs))

    return handle


def audit_drain(sink: WarehouseSink) -> Callable[[list[Msg]], Awaitable[None]]:
    async def handle(msgs: list[Msg]) -> None:
        recs = [r for _, r in _decode_all(msgs, _aud)]
        await sink.insert("audit", audit_table(recs))

    return handle


def drift_drain(sink: WarehouseSink) -> Callable[[list[Msg]], Awaitable[None]]:
    async def handle(msgs: list[Msg]) -> None:
        await sink.insert("drift_events", drift_table([r for _, r in _decode_all(msgs, _drift)]))

    return handle


def dlq_drain(sink: WarehouseSink) -> Callable[[list[Msg]], Awaitable[None]]:
    async def handle(msgs: list[Msg]) -> None:
        await sink.insert("dead_letters", dead_letters_table(_decode_all(msgs, _dlq)))

    return handle


def events_drain(sink: WarehouseSink) -> Callable[[list[Msg]], Awaitable[None]]:
    """Raw history: every event of EVENTS, keyed by its event sequence."""

    async def handle(msgs: list[Msg]) -> None:
        rows: list[tuple[int, StreamEvent]] = []
        for seq, events in _decode_all(msgs, _events):
            rows.extend((seq * SEQ_STRIDE + i, e) for i, e in enumerate(events))
        if rows:
            await sink.insert("events", events_table(rows))

    return handle


def _late_rows(m: Msg) -> list[tuple[int, StreamEvent]]:
    """A LATE message: :class:`LateEvents`, or (written before it existed) a list of events
    with their sequences in a header."""
    try:
        late = _late.decode(m.data)
        seqs, events = late.seqs, late.events
    except msgspec.MsgspecError:
        events = _events.decode(m.data)
        seqs = [int(x) for x in (m.headers or {}).get(SEQS_HEADER, "").split(",")]
    if len(seqs) != len(events):
        raise Undecodable(f"{len(seqs)} sequences for {len(events)} events")
    return list(zip(seqs, events, strict=True))


def late_drain(sink: WarehouseSink) -> Callable[[list[Msg]], Awaitable[None]]:
    """Events a view found too late: the same raw rows again, with ``late = 1``."""

    async def handle(msgs: list[Msg]) -> None:
        rows: list[tuple[int, StreamEvent]] = []
        bad: list[Msg] = []
        for m in msgs:
            try:
                rows.extend(_decoded(m, _late_rows))
            except PoisonMessages:
                bad.append(m)
        if bad:
            raise PoisonMessages(f"{len(bad)} undecodable LATE message(s)", bad)
        if rows:
            await sink.insert("events", events_table(rows, late=True))

    return handle


def features_drain(sink: WarehouseSink) -> Callable[[list[Msg]], Awaitable[None]]:
    async def handle(msgs: list[Msg]) -> None:
        batches = [b for _, b in _decode_all(msgs, _rows)]
        if any(b.rows for b in batches):
            await sink.insert("feature_values", feature_values_table(batches))

    return handle
