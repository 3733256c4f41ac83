"""Audit records onto the AUDIT stream: governance's decisions, and what services decide on
their own (e.g. the features service stopping a failed view version).

Two writers:

- ``AuditLog`` returns once JetStream has acknowledged the record (one round trip).
- ``AuditTrail`` (governance's decisions) returns once the record is on the connection,
  ahead of the reply that carries the decision; its acknowledgement is awaited behind it.
  A NATS connection delivers its messages in order, so a caller holding a decision means
  the server had received the decision's record first. A record not acknowledged in time
  is published again (same message id: stored once) until it is stored, and decisions are
  withheld while the trail lags: any record unconfirmed for longer than ``max_lag_s``, or
  ``max_unconfirmed`` of them in flight. What is lost is only what was in flight when
  governance died while JetStream was failing (the records are logged at shutdown if they
  could not be stored).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from typing import Any

import msgspec
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from myelin import telemetry
from myelin.bus import MSG_ID, OutMsg, Publisher, jetstream
from myelin.errors import Retryable
from myelin.records import AuditRecord
from myelin.settings import Settings
from myelin.subjects import audit_subject
from myelin.tasks import cancel_all

_enc = msgspec.msgpack.Encoder()
log = logging.getLogger(__name__)

WITHHELD = "audit trail unavailable; decision withheld"


def audit_msg(record: AuditRecord) -> OutMsg:
    return OutMsg(
        audit_subject(record.action), _enc.encode(record), msg_id=f"audit-{record.decision_id}"
    )


class AuditLog:
    def __init__(self, publisher: Publisher) -> None:
        self._pub = publisher

    async def __call__(self, record: AuditRecord) -> None:
        result = await self._pub.publish(audit_msg(record))
        if not result.ok:
            raise Retryable(WITHHELD, cause=str(result.error))


class AuditTrail:
    """Audit records written behind the decision, in connection order (see the module's
    notes). ``start`` before use; ``close`` waits for the records in flight.

    Acknowledgements come to an inbox of the trail's own, matched by a counter in the
    reply subject: no future, timer or task per record (nats-py's ``publish_async`` takes
    a task and a semaphore wait for each)."""

    def __init__(
        self,
        nc: NATS,
        settings: Settings,
        max_lag_s: float = 1.0,
        max_unconfirmed: int = 1024,
    ) -> None:
        self._nc = nc
        self._pub = Publisher(jetstream(nc, settings), settings)
        self._timeout = settings.publish_timeout_s
        self.max_lag_s = max_lag_s
        self.max_unconfirmed = max_unconfirmed
        # reply token -> (message, first sent at, being published again); oldest first
        self._unconfirmed: dict[str, tuple[OutMsg, float, bool]] = {}
        self._next = 0
        self._inbox = ""
        self._acks: Subscription | None = None
        self._retrying: set[asyncio.Task[None]] = set()
        self._sweeper: asyncio.Task[None] | None = None
        self._all_stored = asyncio.Event()
        self._all_stored.set()
        self.stored = 0
        self.republished = 0
        self.withheld = 0
        self.last_error = ""

    async def start(self) -> None:
        self._inbox = self._nc.new_inbox()
        self._acks = await self._nc.subscribe(f"{self._inbox}.*", cb=self._on_ack)
        self._sweeper = asyncio.create_task(self._sweep(), name="audit-trail-sweeper")

    @property
    def unconfirmed(self) -> int:
        return len(self._unconfirmed)

    def lag_s(self, now: float | None = None) -> float:
        """How long the oldest unconfirmed record has waited for its acknowledgement."""
        for _msg, sent, _again in self._unconfirmed.values():
            return (time.monotonic() if now is None else now) - sent
        return 0.0

    async def __call__(self, record: AuditRecord) -> None:
        now = time.monotonic()
        if len(self._unconfirmed) >= self.max_unconfirmed or self.lag_s(now) > self.max_lag_s:
            self.withheld += 1
            raise Retryable(
                WITHHELD,
                cause=f"{len(self._unconfirmed)} record(s) unconfirmed, the oldest for "
                f"{self.lag_s(now):.1f}s; last error: {self.last_error or 'none'}",
            )
        msg = audit_msg(record)
        token = str(self._next)
        self._next += 1
        try:
            # buffered on the connection (no wait here): ahead of the caller's reply
            await self._nc.publish(
                msg.subject,
                msg.payload,
                reply=f"{self._inbox}.{token}",
                headers=dict(telemetry.inject({MSG_ID: msg.msg_id})),
            )
        except Exception as exc:
            raise Retryable(WITHHELD, cause=repr(exc)) from exc
        self._unconfirmed[token] = (msg, now, False)
        self._all_stored.clear()

    async def _on_ack(self, ack: Msg) -> None:
        token = ack.subject[len(self._inbox) + 1 :]
        entry = self._unconfirmed.get(token)
        if entry is None or entry[2]:
            return  # confirmed already, or being published again
        if ack.headers and ack.headers.get("Status"):  # 503: no stream took it
            why = f"no stream answered ({ack.headers.get('Status')})"
        elif b'"error"' in ack.data:
            why = ack.data.decode(errors="replace")[:500]
        else:
            self._confirmed(token)
            return
        self._republish_later(token, why)

    def _republish_later(self, token: str, why: str) -> None:
        msg, sent, _again = self._unconfirmed[token]
        self._unconfirmed[token] = (msg, sent, True)  # kept in its place: the lag shows
        self.last_error = why
        task = asyncio.create_task(self._republish(token, msg), name="audit-republish")
        self._retrying.add(task)
        task.add_done_callback(self._retrying.discard)

    async def _republish(self, token: str, msg: OutMsg) -> None:
        """Until stored (same message id: a record that did arrive is not stored twice)."""
        while True:
            result = await self._pub.publish(msg)
            if result.ok:
                self.republished += 1
                self._confirmed(token)
                return
            self.last_error = str(result.error)
            log.warning("audit record %s not stored yet: %s", msg.msg_id, self.last_error)
            await asyncio.sleep(1.0)

    def _confirmed(self, token: str) -> None:
        if self._unconfirmed.pop(token, None) is not None:
            self.stored += 1
        if not self._unconfirmed:
            self._all_stored.set()

    async def _sweep(self) -> None:
        """Records whose acknowledgement did not come in time are published again."""
        while True:
            await asyncio.sleep(min(self._timeout / 2, 1.0))
            deadline = time.monotonic() - self._timeout
            for token, (_msg, sent, again) in list(self._unconfirmed.items()):
                if sent > deadline:
                    break  # oldest first: the rest are younger
                if not again:
                    self._republish_later(token, "no acknowledgement in time")

    async def flush(self, timeout_s: float = 10.0) -> bool:
        """Waits (up to ``timeout_s``) until every record written so far is stored."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._all_stored.wait(), timeout_s)
        return not self._unconfirmed

    async def close(self, timeout_s: float = 10.0) -> None:
        """Waits (up to ``timeout_s``) for every record in flight to be stored; logs, record
        by record, what could not be."""
        await self.flush(timeout_s)
        await cancel_all([*self._retrying, *([self._sweeper] if self._sweeper else [])])
        if self._acks is not None:
            with contextlib.suppress(Exception):
                await self._acks.unsubscribe()
            self._acks = None
        for msg, _sent, _again in self._unconfirmed.values():
            record = msgspec.json.encode(msgspec.msgpack.decode(msg.payload)).decode()
            log.error("audit record not stored (%s): %s", self.last_error, record)
        self._unconfirmed.clear()
        self._all_stored.set()

    def snapshot(self) -> dict[str, Any]:
        return {
            "audit_unconfirmed": len(self._unconfirmed),
            "audit_lag_s": round(self.lag_s(), 3),
            "audit_stored": self.stored,
            "audit_republished": self.republished,
            "audit_withheld": self.withheld,
            "audit_last_error": self.last_error,
        }


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
