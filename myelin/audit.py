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
  ``max_unconfirmed`` of them in flight. What can be lost is only what was in flight when
  governance died while JetStream was failing, or a record written just before a
  connection dropped (published again at the reconnect, unless governance dies first).
  Records that cannot be stored (at shutdown, refused by JetStream) go to the log as JSON.
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
import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from myelin import telemetry
from myelin.bus import MSG_ID, OutMsg, Publisher, PublishRefused, jetstream
from myelin.errors import Poison, Retryable
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

    ``trail(record)`` is for a decision not yet given: refused (``Retryable``) while the
    trail lags. ``trail.after_the_fact(record)`` is for what was done already (a rollback,
    an erasure, a refused connection): never refused, published when it can be, and
    written to the log as JSON when it cannot (lagging far behind, or shutting down).

    Acknowledgements come to an inbox of the trail's own, matched by a counter in the
    reply subject: no future, timer or task per record (nats-py's ``publish_async`` takes
    a task and a semaphore wait for each). The ordering holds within one TCP connection:
    a record the client had written before the connection dropped may be lost with it
    while the reply goes out on the next one, so after a reconnect every unconfirmed
    record is published again at once."""

    def __init__(
        self,
        nc: NATS,
        settings: Settings,
        max_lag_s: float = 1.0,
        max_unconfirmed: int = 1024,
    ) -> None:
        self._nc = nc
        self._pub = Publisher(jetstream(nc, settings), settings)
        self.max_lag_s = max_lag_s
        self.max_unconfirmed = max_unconfirmed
        # an acknowledgement later than this and the record is published again
        self._resend_after_s = min(settings.publish_timeout_s, max_lag_s / 2)
        # reply token -> (message, first sent at, being published again); oldest first
        self._unconfirmed: dict[int, tuple[OutMsg, float, bool]] = {}
        self._next = 0
        self._inbox = ""
        self._inbox_len = 0
        self._acks: Subscription | None = None
        self._retrying: set[asyncio.Task[None]] = set()
        self._sweeper: asyncio.Task[None] | None = None
        self._flushes: list[tuple[int, asyncio.Future[None]]] = []
        self._closed = False
        self._reconnects = 0
        self.stored = 0
        self.republished = 0
        self.withheld = 0
        self.logged_only = 0  # after-the-fact records that went to the log instead
        self.last_error = ""

    async def start(self) -> None:
        self._inbox = self._nc.new_inbox()
        self._inbox_len = len(self._inbox) + 1
        self._acks = await self._nc.subscribe(f"{self._inbox}.*", cb=self._on_ack)
        self._reconnects = self._nc.stats["reconnects"]
        self._sweeper = asyncio.create_task(self._sweep(), name="audit-trail-sweeper")

    @property
    def unconfirmed(self) -> int:
        return len(self._unconfirmed)

    def lag_s(self, now: float | None = None) -> float:
        """How long the oldest unconfirmed record has waited for its acknowledgement."""
        for _msg, sent, _again in self._unconfirmed.values():
            return (time.monotonic() if now is None else now) - sent
        return 0.0

    def lagging(self, now: float | None = None) -> bool:
        """Decisions are withheld: too many records in flight, or one waits too long."""
        return len(self._unconfirmed) >= self.max_unconfirmed or self.lag_s(now) > self.max_lag_s

    async def __call__(self, record: AuditRecord) -> None:
        """The record of a decision about to be given: refused while the trail lags."""
        now = time.monotonic()
        if self._closed or self.lagging(now):
            self.withheld += 1
            raise Retryable(
                WITHHELD,
                cause="governance is stopping"
                if self._closed
                else f"{len(self._unconfirmed)} record(s) unconfirmed, the oldest for "
                f"{self.lag_s(now):.1f}s; last error: {self.last_error or 'none'}",
            )
        try:
            await self._send(audit_msg(record), now)
        except nats.errors.MaxPayloadError as exc:
            raise Poison(
                f"the audit record of {record.action} on {record.subject} is larger than "
                "the NATS server's max_payload: the decision is not given",
                cause=str(exc),
            ) from exc
        except Exception as exc:
            raise Retryable(WITHHELD, cause=repr(exc)) from exc

    async def after_the_fact(self, record: AuditRecord) -> None:
        """The record of something done already: never refused (see the class notes)."""
        msg = audit_msg(record)
        if self._closed or len(self._unconfirmed) >= 10 * self.max_unconfirmed:
            self._log_unstored(msg, "stopping" if self._closed else "lagging")
            return
        try:
            await self._send(msg, time.monotonic())
        except Exception as exc:  # noqa: BLE001 - too large, or the connection is closed
            self._log_unstored(msg, repr(exc))

    async def _send(self, msg: OutMsg, now: float) -> None:
        token = self._next
        self._next += 1
        # buffered on the connection (no wait here): ahead of the caller's reply
        await self._nc.publish(
            msg.subject,
            msg.payload,
            reply=f"{self._inbox}.{token}",
            headers=dict(telemetry.inject({MSG_ID: msg.msg_id})),
        )
        self._unconfirmed[token] = (msg, now, False)

    async def _on_ack(self, ack: Msg) -> None:
        try:
            token = int(ack.subject[self._inbox_len :])
        except ValueError:
            return
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

    def _republish_later(self, token: int, why: str) -> None:
        msg, sent, _again = self._unconfirmed[token]
        self._unconfirmed[token] = (msg, sent, True)  # kept in its place: the lag shows
        self.last_error = why
        task = asyncio.create_task(self._republish(token, msg), name="audit-republish")
        self._retrying.add(task)
        task.add_done_callback(self._retrying.discard)

    async def _republish(self, token: int, msg: OutMsg) -> None:
        """Until stored (same message id: a record that did arrive is not stored twice);
        a record JetStream refuses for what it is goes to the log instead."""
        try:
            while token in self._unconfirmed:
                result = await self._pub.publish(msg)
                if result.ok:
                    self.republished += 1
                    self._confirmed(token)
                    return
                self.last_error = str(result.error)
                if isinstance(result.error, PublishRefused):
                    self._log_unstored(msg, self.last_error)
                    self._confirmed(token, stored=False)
                    return
                log.warning("audit record %s not stored yet: %s", msg.msg_id, self.last_error)
                await asyncio.sleep(min(self.max_lag_s, 1.0))
        except Exception as exc:
            log.exception("publishing audit record %s again failed", msg.msg_id)
            self.last_error = repr(exc)
            entry = self._unconfirmed.get(token)
            if entry is not None:  # the sweeper takes it up again
                self._unconfirmed[token] = (entry[0], entry[1], False)

    def _confirmed(self, token: int, stored: bool = True) -> None:
        if self._unconfirmed.pop(token, None) is not None and stored:
            self.stored += 1
        if self._flushes:
            self._wake_flushes()

    def _wake_flushes(self) -> None:
        """Ends each flush whose records (those written before it began) are all settled."""
        oldest = next(iter(self._unconfirmed), self._next)
        waiting = []
        for mark, fut in self._flushes:
            if oldest < mark:
                waiting.append((mark, fut))
            elif not fut.done():
                fut.set_result(None)
        self._flushes = waiting

    def _log_unstored(self, msg: OutMsg, why: str) -> None:
        self.logged_only += 1
        record = msgspec.json.encode(msgspec.msgpack.decode(msg.payload)).decode()
        log.error("audit record not stored (%s): %s", why, record)

    async def _sweep(self) -> None:
        """Records whose acknowledgement did not come in time, and every unconfirmed one
        after a reconnect, are published again."""
        while True:
            await asyncio.sleep(self.max_lag_s / 4)
            reconnects = self._nc.stats["reconnects"]
            reconnected, self._reconnects = reconnects != self._reconnects, reconnects
            deadline = time.monotonic() - self._resend_after_s
            for token, (_msg, sent, again) in list(self._unconfirmed.items()):
                if sent > deadline and not reconnected:
                    break  # oldest first: the rest are younger
                if not again:
                    self._republish_later(
                        token, "reconnected" if reconnected else "no acknowledgement in time"
                    )

    async def flush(self, timeout_s: float = 10.0) -> bool:
        """Waits (up to ``timeout_s``) until every record written so far is stored."""
        mark = self._next
        if next(iter(self._unconfirmed), mark) >= mark:
            return True
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._flushes.append((mark, fut))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(fut, timeout_s)
        return next(iter(self._unconfirmed), mark) >= mark

    async def close(self, timeout_s: float = 10.0) -> None:
        """Waits (up to ``timeout_s``) for every record in flight to be stored; logs, record
        by record, what could not be. Records that come later go to the log."""
        self._closed = True
        await self.flush(timeout_s)
        await cancel_all([*self._retrying, *([self._sweeper] if self._sweeper else [])])
        if self._acks is not None:
            with contextlib.suppress(Exception):
                await self._acks.unsubscribe()
            self._acks = None
        for msg, _sent, _again in self._unconfirmed.values():
            self._log_unstored(msg, self.last_error or "not acknowledged by shutdown")
        self._unconfirmed.clear()
        self._wake_flushes()  # any flush still waiting ends

    def snapshot(self) -> dict[str, Any]:
        return {
            "audit_unconfirmed": len(self._unconfirmed),
            "audit_lag_s": round(self.lag_s(), 3),
            "audit_stored": self.stored,
            "audit_republished": self.republished,
            "audit_withheld": self.withheld,
            "audit_logged_only": self.logged_only,
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
