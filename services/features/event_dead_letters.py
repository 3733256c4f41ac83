"""Outbound adapter: EVENTS messages or events a feature view cannot read, to the DLQ.

Ids are ``dlq:MYELIN_EVENTS:<seq>`` for a whole message and ``...:<seq>:<index>`` for one
event of it: every view version reads EVENTS, and the stream stores each dead letter once.
Payloads are redacted (size and hash): nobody vouched for what is in them.
"""

from __future__ import annotations

import time

import msgspec

from myelin.bus import OutMsg, Publisher, raise_unless_stored
from myelin.dead_letters import redacted
from myelin.records import DeadLetter
from myelin.subjects import EVENTS_STREAM, dlq_subject
from services.features.pipeline import BadEvent, DeadLetters

_enc = msgspec.msgpack.Encoder()


def event_dead_letters(pub: Publisher, consumer: str) -> DeadLetters:
    async def dead_letter(bad: list[BadEvent]) -> None:
        now = int(time.time() * 1000)
        msgs = []
        for b in bad:
            ev = b.event
            detail = {"stream": EVENTS_STREAM, "seq": str(b.stream_seq), "consumer": consumer}
            if ev is not None:
                detail |= {
                    "index": str(b.index),
                    "type": ev.type,
                    "schema_version": str(ev.schema_version),
                }
            record = DeadLetter(
                reason=b.reason,
                message=b.message,
                producer_id=ev.producer_id if ev else "",
                event_id=ev.event_id if ev else "",
                ts_ms=now,
                detail=detail,
                payload=redacted(b.payload),
            )
            key = f"{b.stream_seq}" if b.index < 0 else f"{b.stream_seq}:{b.index}"
            msgs.append(
                OutMsg(dlq_subject(b.reason), _enc.encode(record), f"dlq:{EVENTS_STREAM}:{key}")
            )
        raise_unless_stored(await pub.publish_batch(msgs), "DLQ stream")

    return dead_letter
