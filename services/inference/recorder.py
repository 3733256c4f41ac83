"""Outbound adapter: every inference onto the INFERENCES stream (the ledger).

A bounded queue between request handlers and one publisher task: recording never waits on
JetStream and never changes a response. Policy when the queue is full (JetStream
unreachable for longer than the queue lasts: 20,000 records, ~20 s at 1,000 requests/s):
the new record is dropped and counted (``records_dropped``), the response goes out as it
would have, and the service reports itself not ready while the queue is over 90% full.
A request id is recorded once per model and route: a client's retry of a request it already
got an answer to adds nothing (``records_deduplicated``; ClickHouse also keys the ledger on
it), and the shadow's score of a request is recorded beside the champion's.
On shutdown the queue is drained before the connection closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid

import msgspec

from myelin import telemetry
from myelin.bus import OutMsg, Publisher
from myelin.records import InferenceRecord
from myelin.subjects import inference_subject
from myelin.tasks import cancel_and_wait

log = logging.getLogger(__name__)
_enc = msgspec.msgpack.Encoder()


RECENT_IDS = 100_000  # request ids remembered for the once-per-request rule


class Recorder:
    def __init__(
        self,
        publisher: Publisher,
        max_queued: int = 20_000,
        batch: int = 256,
        linger_s: float = 0.005,
    ) -> None:
        self._pub = publisher
        self._q: asyncio.Queue[InferenceRecord] = asyncio.Queue(max_queued)
        self._max = max_queued
        self._batch = batch
        self._linger_s = linger_s  # records gather this long into one message under load
        self._task: asyncio.Task[None] | None = None
        self._recent: dict[tuple[str, str, str], None] = {}
        self.published = 0
        self.dropped = 0
        self.deduplicated = 0

    def record(self, rec: InferenceRecord) -> None:
        """Queue ``rec``; never raises and never waits (see the module's policy)."""
        key = (rec.model, rec.request_id, rec.route)
        if key in self._recent:
            self.deduplicated += 1
            return
        try:
            self._q.put_nowait(rec)
        except asyncio.QueueFull:
            self.dropped += 1
            if self.dropped == 1 or not self.dropped % 1000:
                log.error(
                    "inference ledger queue full (%d): %d records dropped so far; is JetStream "
                    "reachable?",
                    self._max,
                    self.dropped,
                )
            return
        recent = self._recent
        recent[key] = None
        if len(recent) > RECENT_IDS:
            del recent[next(iter(recent))]

    @property
    def nearly_full(self) -> bool:
        return self._q.qsize() > 0.9 * self._max

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="inference-recorder")

    async def _run(self) -> None:
        while True:
            first = await self._q.get()
            if self._q.qsize() < self._batch and self._linger_s:
                await asyncio.sleep(self._linger_s)
            recs = [first]
            while len(recs) < self._batch and not self._q.empty():
                recs.append(self._q.get_nowait())
            await self._publish(recs)
            for _ in recs:
                self._q.task_done()

    async def _publish(self, recs: list[InferenceRecord]) -> None:
        # One message per model per drained batch (a msgpack list of records): the cost of
        # a JetStream publish is paid per batch. Ids are fixed before the first attempt, so
        # a retry after a lost ack is deduplicated by the stream.
        by_model: dict[str, list[InferenceRecord]] = {}
        for r in recs:
            by_model.setdefault(r.model, []).append(r)
        pending = [
            (OutMsg(inference_subject(m), _enc.encode(g), f"inf-{uuid.uuid4().hex}"), len(g))
            for m, g in by_model.items()
        ]
        # the message carries this span's context: in the first record's trace, linked
        # to every record's (each request's) trace
        with telemetry.batch_span(
            "myelin.inference",
            "record inferences",
            [telemetry.span_context_of_trace_id(r.trace_id) for r in recs],
            {"myelin.records": len(recs)},
        ):
            await self._publish_until_stored(pending)

    async def _publish_until_stored(self, pending: list[tuple[OutMsg, int]]) -> None:
        delay = 0.1
        while pending:
            results = await self._pub.publish_batch([m for m, _ in pending])
            self.published += sum(n for (_, n), r in zip(pending, results, strict=True) if r.ok)
            pending = [p for p, r in zip(pending, results, strict=True) if not r.ok]
            if pending:
                log.warning("%d inference record batches not stored yet; retrying", len(pending))
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def close(self, timeout_s: float = 30.0) -> None:
        if self._task is None:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._q.join(), timeout_s)
        await cancel_and_wait(self._task)
        self._task = None

    @property
    def queued(self) -> int:
        return self._q.qsize()
