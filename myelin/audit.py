"""Audit records onto the AUDIT stream (durably acked): governance's decisions, and what
services decide on their own (e.g. the features service stopping a failed view version).
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

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


def platform_record(
    action: str,
    subject: str,
    reasons: list[str],
    input_doc: dict[str, Any],
    trace_id: str = "",
    *,
    allow: bool = False,
) -> AuditRecord:
    """An audit record of something the platform did by itself (no policy was asked)."""
    return AuditRecord(
        decision_id=uuid.uuid4().hex,
        ts_ms=int(time.time() * 1000),
        action=action,
        subject=subject,
        allow=allow,
        reasons=reasons,
        policy_version="",
        input_json=json.dumps(input_doc, sort_keys=True, separators=(",", ":"), default=str),
        trace_id=trace_id,
    )
