"""The ingest use case: validate a batch, publish what passed, dead-letter what did not.

Back-pressure: a bounded number of events may be in flight at once; a batch that does
not fit is refused whole with :class:`~myelin.errors.Overloaded` (nothing of it applied),
and events the JetStream window could not take are reported ``retry``, never dropped.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

import msgspec
import nats.errors

from myelin import telemetry
from myelin.bus import OutMsg, Publisher
from myelin.errors import Overloaded, Retryable
from myelin.records import DeadLetter
from myelin.subject_keys import SubjectKeyError, SubjectKeys
from myelin.subjects import dlq_subject
from services.ingest.logic import (
    Accepted,
    BatchRefused,
    RecentIds,
    Rejected,
    Validator,
    parse_batch,
    plan_messages,
)

_mp = msgspec.msgpack.Encoder()


class EventResult(msgspec.Struct, frozen=True, omit_defaults=True):
    index: int
    event_id: str
    status: str  # duplicate | rejected | retry
    reason: str = ""
    message: str = ""


STATUS_CODES = {"accepted": "a", "duplicate": "d", "rejected": "r", "retry": "t"}


class BatchResult(msgspec.Struct, frozen=True):
    """Per-event outcome: ``statuses`` has one letter per event, in batch order
    (a = accepted, d = duplicate, r = rejected, t = retry); ``results`` details every event
    that was not accepted (reason and message)."""

    accepted: int
    duplicates: int
    rejected: int
    retry: int
    statuses: str
    results: list[EventResult]
    retry_after_s: float = 0.0


@dataclass
class Counters:
    accepted: int = 0
    duplicates: int = 0
    rejected: int = 0
    refused_batches: int = 0
    overloaded: int = 0
    by_reason: dict[str, int] = field(default_factory=dict)


class InflightLimit:
    """A non-blocking counting limit: callers that do not fit are told to come back."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.used = 0

    def try_acquire(self, n: int) -> bool:
        if self.used and self.used + n > self.capacity:
            return False
        self.used += n
        return True

    def release(self, n: int) -> None:
        self.used -= n


class Ingestor:
    def __init__(
        self,
        validator: Validator,
        publisher: Publisher,
        max_inflight_events: int,
        recent: RecentIds,
        subject_keys: SubjectKeys | None = None,
    ) -> None:
        """``subject_keys``: PII is sealed with each subject's own (erasable) key; without
        it, tokenized with the deployment-wide HMAC key."""
        self.validator = validator  # replaced atomically when the contracts registry changes
        self._subject_keys = subject_keys
        self._pub = publisher
        self._inflight = InflightLimit(max_inflight_events)
        self._recent = recent
        self.counters = Counters()

    @property
    def limits(self) -> Any:
        return self.validator.limits

    async def ingest(
        self, body: bytes, *, per_event: bool = False, producer: str = ""
    ) -> BatchResult:
        """Raises :class:`BatchRefused` or :class:`Overloaded` for whole-batch outcomes.
        ``producer``: the authenticated sender, stamped on every event ('' keeps what each
        envelope says: a server without authentication)."""
        try:
            items = parse_batch(body, self.validator.limits)
        except BatchRefused as refused:
            await self.reject_batch(body, refused)
            raise
        return await self.ingest_items(items, body=body, per_event=per_event, producer=producer)

    async def reject_batch(self, body: bytes, refused: BatchRefused) -> None:
        self.counters.refused_batches += 1
        await self._dead_letter(
            [self.validator.reject(-1, body, refused.reason, refused.message)],
            int(time.time() * 1000),
        )

    async def ingest_items(
        self,
        items: list[msgspec.Raw],
        *,
        body: bytes | None = None,
        per_event: bool = False,
        producer: str = "",
    ) -> BatchResult:
        n = len(items)
        if not self._inflight.try_acquire(n):
            self.counters.overloaded += 1
            raise Overloaded(
                f"{self._inflight.used} events in flight (limit {self._inflight.capacity}); retry later",
                retry_after=0.25,
            )
        now_ms = int(time.time() * 1000)
        statuses = bytearray(b"t" * n)  # anything not settled below is "retry"
        details: list[EventResult] = []
        acc = dup = 0
        retry_after = 0.0
        try:
            # Every event carries a trace id, even when no tracing backend is configured.
            trace_id = telemetry.trace_id_hex() or secrets.token_hex(16)
            validator = self.validator
            envs = validator.envelopes(items, body)
            keys: dict[str, bytes] | None = None
            if self._subject_keys is not None:
                subjects = validator.pii_subjects(items, envs)
                try:
                    keys = await self._subject_keys.keys_for(subjects) if subjects else {}
                except (Retryable, SubjectKeyError, nats.errors.Error, TimeoutError) as exc:
                    raise Overloaded(
                        f"subject keys unavailable: {exc!r}", retry_after=1.0
                    ) from None
            outcomes = validator.batch(items, now_ms, trace_id, body, producer, keys, envs)
            accepted: list[Accepted] = []
            rejected: list[Rejected] = []
            seen = self._recent.seen
            for o in outcomes:
                if isinstance(o, Accepted):
                    if seen(o.event_id, now_ms):
                        dup += 1
                        statuses[o.index] = 100  # "d"
                        details.append(EventResult(o.index, o.event_id, "duplicate"))
                    else:
                        accepted.append(o)
                else:
                    rejected.append(o)
            planned = plan_messages(accepted, per_event)
            headers = dict(telemetry.inject({}))
            pubs = await self._pub.publish_batch(
                [OutMsg(p.subject, p.payload, p.msg_id, headers) for p in planned]
            )
            await self._dead_letter(rejected, now_ms)
        finally:
            self._inflight.release(n)
        for p, r in zip(planned, pubs, strict=True):
            if r.ok:
                self._recent.add(p.event_ids, now_ms)
                if r.duplicate:
                    dup += len(p.indices)
                    for i, eid in zip(p.indices, p.event_ids, strict=True):
                        statuses[i] = 100  # "d"
                        details.append(EventResult(i, eid, "duplicate"))
                else:
                    acc += len(p.indices)
                    for i in p.indices:
                        statuses[i] = 97  # "a"
            else:
                err = r.error
                retry_after = max(
                    retry_after, err.retry_after if isinstance(err, Overloaded) else 1.0
                )
                msg = err.message if err else "not stored; retry with the same event_id"
                details += [
                    EventResult(i, eid, "retry", "overloaded", msg)
                    for i, eid in zip(p.indices, p.event_ids, strict=True)
                ]
        for rj in rejected:
            statuses[rj.index] = 114  # "r"
            details.append(
                EventResult(rj.index, rj.event_id, "rejected", rj.reason.value, rj.message)
            )
            self.counters.by_reason[rj.reason.value] = (
                self.counters.by_reason.get(rj.reason.value, 0) + 1
            )
        retry = n - acc - dup - len(rejected)
        self.counters.accepted += acc
        self.counters.duplicates += dup
        self.counters.rejected += len(rejected)
        details.sort(key=lambda d: d.index)
        return BatchResult(acc, dup, len(rejected), retry, statuses.decode(), details, retry_after)

    async def _dead_letter(self, rejected: list[Rejected], now_ms: int) -> None:
        if not rejected:
            return
        msgs = []
        for r in rejected:
            record = DeadLetter(
                reason=r.reason.value,
                message=r.message,
                producer_id=r.producer_id,
                event_id=r.event_id,
                ts_ms=now_ms,
                payload=r.raw.decode("utf-8", errors="replace"),
            )
            # Same event + same reason -> same id: a retried bad batch is dead-lettered once.
            key = r.event_id or _digest(r.raw)
            msgs.append(
                OutMsg(dlq_subject(r.reason.value), _mp.encode(record), f"dlq:{r.reason}:{key}")
            )
        await self._pub.publish_batch(msgs)

    def status(self) -> dict[str, Any]:
        c = self.counters
        return {
            "accepted": c.accepted,
            "duplicates": c.duplicates,
            "rejected": c.rejected,
            "refused_batches": c.refused_batches,
            "overloaded": c.overloaded,
            "rejected_by_reason": dict(c.by_reason),
            "in_flight": self._inflight.used,
            "recent_ids": len(self._recent),
            "contracts": len(self.validator.registry),
        }


def _digest(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()[:32]
