"""Inbound adapters: the INFERENCES, AUDIT and DLQ streams drained into ClickHouse.

Idempotent: rows are keyed on ids carried by the records, in ReplacingMergeTree tables.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

import msgspec
from nats.aio.msg import Msg

from myelin.records import AuditRecord, DeadLetter, InferenceRecord
from services.features.warehouse_sink import (
    WarehouseSink,
    audit_table,
    dead_letters_table,
    inferences_table,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

_inf = msgspec.msgpack.Decoder(list[InferenceRecord])  # the recorder publishes batches
_aud = msgspec.msgpack.Decoder(AuditRecord)
_dlq = msgspec.msgpack.Decoder(DeadLetter)


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
