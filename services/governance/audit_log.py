"""Outbound adapter: audit records onto the AUDIT stream (durably acked)."""

from __future__ import annotations

import msgspec

from myelin.bus import OutMsg, Publisher
from myelin.errors import Retryable
from myelin.records import AuditRecord
from myelin.subjects import audit_subject

_enc = msgspec.msgpack.Encoder()


class AuditLog:
    def __init__(self, publisher: Publisher) -> None:
        self._pub = publisher

    async def __call__(self, record: AuditRecord) -> None:
        msg = OutMsg(
            audit_subject(record.action), _enc.encode(record), msg_id=f"audit-{record.decision_id}"
        )
        result = await self._pub.publish(msg)
        if not result.ok:
            raise Retryable("audit trail unavailable; decision withheld", cause=str(result.error))
