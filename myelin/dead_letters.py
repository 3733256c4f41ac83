"""Dead letters of consumers: a message a consumer can never process goes to the DLQ
stream with its reason, where it came from (stream, sequence, consumer, subject) and a
sanitized payload, before it is terminated (see :mod:`myelin.consume`).

The record's id is ``dlq:<stream>:<sequence>``: several consumers of one stream giving up
on the same message (every feature view version reads EVENTS) store it once.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable

import msgspec
from nats.aio.msg import Msg

from myelin.bus import OutMsg, Publisher
from myelin.consume import DeadLetterSink
from myelin.errors import Retryable
from myelin.records import DeadLetter
from myelin.subjects import dlq_subject

_enc = msgspec.msgpack.Encoder()
_json = msgspec.json.Encoder()


def redacted(data: bytes) -> str:
    """A payload nobody vouched for may hold anything, personal data included: only its
    size and hash are kept (the message itself stays in its stream until it ages out)."""
    return _json.encode(
        {"redacted": True, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    ).decode()


def _sanitized(sanitize: Callable[[bytes], str], data: bytes) -> str:
    try:
        return sanitize(data)
    except Exception:  # noqa: BLE001 - whatever the payload does to a sanitizer: keep none of it
        return redacted(data)


def consumer_dead_letters(
    pub: Publisher,
    consumer: str,
    *,
    sanitize: Callable[[bytes], str] = redacted,
    producer_of: Callable[[Msg], str] = lambda _m: "",
) -> DeadLetterSink:
    async def dead_letter(msg: Msg, reason: str, message: str) -> None:
        meta = msg.metadata
        stream, seq = meta.stream, meta.sequence.stream
        record = DeadLetter(
            reason=reason,
            message=message,
            producer_id=producer_of(msg),
            event_id="",
            ts_ms=int(time.time() * 1000),
            detail={
                "stream": stream,
                "seq": str(seq),
                "consumer": consumer,
                "subject": msg.subject,
                "deliveries": str(meta.num_delivered),
            },
            payload=_sanitized(sanitize, msg.data or b""),
        )
        result = await pub.publish(
            OutMsg(dlq_subject(reason), _enc.encode(record), f"dlq:{stream}:{seq}")
        )
        if not result.ok:
            raise Retryable(f"the DLQ stream did not store the dead letter: {result.error}")

    return dead_letter
