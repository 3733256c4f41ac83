"""Inbound adapters: the EVENTS, LATE, FEATURES, INFERENCES, AUDIT and DLQ streams
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

from myelin.contracts import StreamEvent
from myelin.records import AuditRecord, DeadLetter, FeatureRows, InferenceRecord
from services.warehouse.sink import (
    WarehouseSink,
    audit_table,
    dead_letters_table,
    events_table,
    feature_values_table,
    inferences_table,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

_inf = msgspec.msgpack.Decoder(list[InferenceRecord])  # the recorder publishes batches
_aud = msgspec.msgpack.Decoder(AuditRecord)
_dlq = msgspec.msgpack.Decoder(DeadLetter)
_events = msgspec.msgpack.Decoder(list[StreamEvent])
_rows = msgspec.msgpack.Decoder(FeatureRows)
SEQ_STRIDE = 1000  # event seq = stream sequence x 1000 + index in the message
SEQS_HEADER = "Myelin-Event-Seqs"  # on LATE messages: the events' sequences, comma-separated


def _decode_all(msgs: list[Msg], dec: msgspec.msgpack.Decoder[T]) -> list[tuple[int, T]]:
    out: list[tuple[int, T]] = []
    for m in msgs:
        try:
            out.append((m.metadata.sequence.stream, dec.decode(m.data)))
        except msgspec.MsgspecError as exc:
            log.warning("skipping undecodable record on %s: %s", m.subject, exc)
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


def late_drain(sink: WarehouseSink) -> Callable[[list[Msg]], Awaitable[None]]:
    """Events a view found too late: the same raw rows again, with ``late = 1``."""

    async def handle(msgs: list[Msg]) -> None:
        rows: list[tuple[int, StreamEvent]] = []
        for m in msgs:
            try:
                events = _events.decode(m.data)
                seqs = [int(x) for x in (m.headers or {}).get(SEQS_HEADER, "").split(",")]
                if len(seqs) != len(events):
                    raise ValueError(f"{len(seqs)} sequences for {len(events)} events")
            except (msgspec.MsgspecError, ValueError) as exc:
                log.warning("skipping undecodable LATE message %s: %s", m.subject, exc)
                continue
            rows.extend(zip(seqs, events, strict=True))
        if rows:
            await sink.insert("events", events_table(rows, late=True))

    return handle


def features_drain(sink: WarehouseSink) -> Callable[[list[Msg]], Awaitable[None]]:
    async def handle(msgs: list[Msg]) -> None:
        batches = [b for _, b in _decode_all(msgs, _rows)]
        if any(b.rows for b in batches):
            await sink.insert("feature_values", feature_values_table(batches))

    return handle
