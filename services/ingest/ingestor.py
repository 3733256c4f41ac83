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

from myelin import telemetry
from myelin.bus import OutMsg, Publisher
from myelin.contracts import ContractRegistry
from myelin.errors import Overloaded
from myelin.records import DeadLetter
from myelin.subjects import dlq_subject
from services.ingest.logic import (
    Accepted,
    BatchRefused,
    Limits,
    Reason,
    Rejected,
    parse_batch,
    validate_batch,
)

_mp = msgspec.msgpack.Encoder()


class EventResult(msgspec.Struct, frozen=True, omit_defaults=True):
    index: int
    event_id: str
    status: str  # accepted | duplicate | rejected | retry
    reason: str = ""
    message: str = ""
    seq: int = 0


class BatchResult(msgspec.Struct, frozen=True):
    accepted: int
    duplicates: int
    rejected: int
    retry: int
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
        registry: ContractRegistry,
        limits: Limits,
        publisher: Publisher,
        max_inflight_events: int,
    ) -> None:
        self.registry = registry
        self.limits = limits
        self._pub = publisher
        self._inflight = InflightLimit(max_inflight_events)
        self.counters = Counters()

    async def ingest(self, body: bytes) -> BatchResult:
        """Raises :class:`BatchRefused` or :class:`Overloaded` for whole-batch outcomes."""
        now_ms = int(time.time() * 1000)
        try:
            items = parse_batch(body, self.limits)
        except BatchRefused as refused:
            self.counters.refused_batches += 1
            await self._dead_letter(
                [Rejected(-1, "", refused.reason, refused.message, body[:65536])], now_ms
            )
            raise
        n = len(items)
        if not self._inflight.try_acquire(n):
            self.counters.overloaded += 1
            raise Overloaded(
                f"{self._inflight.used} events in flight (limit {self._inflight.capacity}); retry later",
                retry_after=1.0,
            )
        try:
            # Every event carries a trace id, even when no tracing backend is configured.
            trace_id = telemetry.trace_id_hex() or secrets.token_hex(16)
            outcomes = validate_batch(items, self.registry, self.limits, now_ms, trace_id)
            accepted = [o for o in outcomes if isinstance(o, Accepted)]
            rejected = [o for o in outcomes if isinstance(o, Rejected)]
            headers = telemetry.inject({})
            msgs = [OutMsg(a.subject, a.payload, a.event_id, dict(headers)) for a in accepted]
            pub_results = await self._pub.publish_batch(msgs) if msgs else []
            await self._dead_letter(rejected, now_ms)
        finally:
            self._inflight.release(n)
        results: list[EventResult] = [EventResult(-1, "", "")] * n
        acc = dup = retry = 0
        retry_after = 0.0
        for a, r in zip(accepted, pub_results, strict=True):
            if r.ok and r.duplicate:
                dup += 1
                results[a.index] = EventResult(a.index, a.event_id, "duplicate", seq=r.seq)
            elif r.ok:
                acc += 1
                results[a.index] = EventResult(a.index, a.event_id, "accepted", seq=r.seq)
            else:
                retry += 1
                err = r.error
                retry_after = max(
                    retry_after, err.retry_after if isinstance(err, Overloaded) else 1.0
                )
                results[a.index] = EventResult(
                    a.index,
                    a.event_id,
                    "retry",
                    Reason.OVERLOADED.value,
                    err.message if err else "not stored; retry with the same event_id",
                )
        for rj in rejected:
            results[rj.index] = EventResult(
                rj.index, rj.event_id, "rejected", rj.reason.value, rj.message
            )
            self.counters.by_reason[rj.reason.value] = (
                self.counters.by_reason.get(rj.reason.value, 0) + 1
            )
        self.counters.accepted += acc
        self.counters.duplicates += dup
        self.counters.rejected += len(rejected)
        return BatchResult(acc, dup, len(rejected), retry, results, retry_after)

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
            key = r.event_id or hashlib.sha256(r.raw).hexdigest()[:32]
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
        }
