"""Shadow scoring, off the hot path: a version scored on exactly the features the champion
was served, recorded with the champion's record (the ledger stores it as rows of route
``shadow``), never seen by the client.

Requests hand their feature matrix and ledger record to a bounded queue and return; one
task drains the queue every 10 ms, scores everything queued for a version in one
onnxruntime call (in the event loop up to 1,024 rows: tens of microseconds; beyond, in a
worker thread), counts drift for the shadow version and records each request with its shadow scores. When the
queue is full the shadow score of that request is dropped and counted (``shadow_dropped``)
and the request is recorded without it: the champion's answer never waits on its shadow.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import msgspec
import numpy as np
import numpy.typing as npt

from myelin.records import InferenceRecord
from myelin.tasks import cancel_and_wait
from services.inference.logic import positive_scores, probabilities

if TYPE_CHECKING:
    from services.inference.model_host import LoadedModel
    from services.inference.recorder import Recorder

log = logging.getLogger(__name__)
INLINE_ROWS = 1024  # shadow batches up to this many rows are scored in the event loop


@dataclass(frozen=True)
class _Job:
    model: LoadedModel
    x: npt.NDArray[np.float32]
    served: InferenceRecord  # the champion's record: the shadow's mirrors it


class ShadowScorer:
    def __init__(
        self,
        recorder: Recorder,
        max_queued: int = 10_000,
        batch: int = 512,
        linger_s: float = 0.01,
    ) -> None:
        """``linger_s``: how long the first queued score waits for others, so that shadow
        work is done in few, large onnxruntime calls."""
        self._recorder = recorder
        self._linger_s = linger_s
        self._q: asyncio.Queue[_Job] = asyncio.Queue(max_queued)
        self._batch = batch
        self._task: asyncio.Task[None] | None = None
        self.scored = 0
        self.mismatched = 0  # shadow reads other features than the champion: not scored
        self.dropped = 0
        self.failed = 0

    def submit(
        self, model: LoadedModel, x: npt.NDArray[np.float32], served: InferenceRecord
    ) -> None:
        """Queue a shadow score of ``served``'s rows, then its recording (with the shadow's
        scores); never waits, never raises."""
        try:
            self._q.put_nowait(_Job(model, x, served))
        except asyncio.QueueFull:
            self._recorder.record(served)
            self.dropped += 1
            if self.dropped == 1 or not self.dropped % 1000:
                log.warning("shadow queue full: %d shadow scores dropped so far", self.dropped)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="shadow-scorer")

    async def _run(self) -> None:
        while True:
            jobs = [await self._q.get()]
            if self._linger_s and self._q.qsize() < self._batch:
                await asyncio.sleep(self._linger_s)
            while len(jobs) < self._batch and not self._q.empty():
                jobs.append(self._q.get_nowait())
            by_model: dict[int, list[_Job]] = {}
            for job in jobs:
                by_model.setdefault(id(job.model), []).append(job)
            for group in by_model.values():
                try:
                    await self._score(group)
                except Exception:
                    self.failed += len(group)
                    log.exception("shadow scoring of %s failed", group[0].model.mv.name)
                    for job in group:  # the served answers are recorded all the same
                        self._recorder.record(job.served)
            for _ in jobs:
                self._q.task_done()

    async def _score(self, jobs: list[_Job]) -> None:
        model = jobs[0].model
        x = jobs[0].x if len(jobs) == 1 else np.concatenate([j.x for j in jobs])
        t0 = time.perf_counter()
        if len(x) <= INLINE_ROWS:
            # tens of microseconds: cheaper in the loop than a hand-over to a thread, whose
            # GIL hand-offs stall the loop for milliseconds under load
            outputs = model.ort.run_one(x)
        else:
            outputs = await asyncio.to_thread(model.ort.run_one, x)
        score_us = int((time.perf_counter() - t0) * 1e6 / len(jobs))
        scores = positive_scores(probabilities(model.ort.outputs, outputs))
        if model.drift is not None:
            model.drift.observe(x.tolist(), scores)
        at = 0
        for job in jobs:
            n = len(job.served.predictions)
            self._recorder.record(
                msgspec.structs.replace(
                    job.served,
                    shadow_version=model.version,
                    shadow_scores=scores[at : at + n],
                    shadow_us=score_us,
                )
            )
            at += n
        self.scored += len(jobs)

    @property
    def queued(self) -> int:
        return self._q.qsize()

    async def close(self, timeout_s: float = 10.0) -> None:
        if self._task is None:
            return
        try:
            await asyncio.wait_for(self._q.join(), timeout_s)
        except TimeoutError:
            log.warning("%d shadow scores not done at shutdown", self._q.qsize())
        await cancel_and_wait(self._task)
        self._task = None
