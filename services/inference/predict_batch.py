"""Adaptive micro-batching of Predict: while a batch for a model version is being read and
scored (or, when the server is busy, for up to 2 ms before it starts), the requests for
it that arrive wait and then go together, in one online read (one Redis round trip) and
one onnxruntime run. Python's per-call costs are then paid per batch rather than per
request, and batches grow with the load: a lone request starts at once and is scored
alone.

Each request gets its own rows back; the read and score times are those of the batch it
was part of. A failure of the shared read (an unknown view, Redis down) fails every
request of the batch the way it would have failed alone.
"""

from __future__ import annotations

import asyncio
import copy
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from myelin.errors import MyelinError
from myelin.online import EntityVector, OnlineReader, UnknownView
from services.inference.logic import feature_matrix, positive_scores, probabilities

if TYPE_CHECKING:
    from services.inference.model_host import LoadedModel

MAX_BATCH_ROWS = 2048  # past this, waiting requests are scored in several batches
# A request that arrives while another is being served (the server is busy: gRPC hands
# requests over one at a time, so under load they queue in gRPC, not here) starts a batch
# that waits LINGER_S for company; a request alone starts at once, latency untouched.
LINGER_S = 0.002


class FeaturesUnavailable(MyelinError):
    code = "features_unavailable"


def pinned_version(view: str, refs: list[str]) -> str:
    """The hash ``view@hash`` in a model's provenance pins for ``view`` ('' if none)."""
    for ref in refs:
        name, _, version = ref.partition("@")
        if name == view and version:
            return version
    return ""


@dataclass(frozen=True)
class Scored:
    """One request's part of a batch."""

    vectors: list[EntityVector]
    x: npt.NDArray[np.float32]  # its rows as the model saw them
    scores: list[float]
    read_us: int  # the batch's online read
    score_us: int  # the batch's model run


@dataclass
class _Ask:
    entity_ids: list[str]
    future: asyncio.Future[Scored]


class PredictBatcher:
    def __init__(self, reader: OnlineReader) -> None:
        self._reader = reader
        self._waiting: dict[int, list[_Ask]] = {}  # per model: requests for the next batch
        self._busy: set[int] = set()  # models with a batch in flight (or lingering)
        self._tasks: set[asyncio.Task[None]] = set()
        self.batches = 0
        self.lingered = 0  # batches that waited for company (the server was busy)

    def score(
        self, model: LoadedModel, entity_ids: list[str], crowded: bool = False
    ) -> asyncio.Future[Scored]:
        """``crowded``: other requests are in progress (the batch may wait for company)."""
        future: asyncio.Future[Scored] = asyncio.get_running_loop().create_future()
        key = id(model)
        self._waiting.setdefault(key, []).append(_Ask(entity_ids, future))
        if key not in self._busy:
            if crowded:
                self.lingered += 1
                self._busy.add(key)
                asyncio.get_running_loop().call_later(LINGER_S, self._next, model)
            else:
                self._next(model)
        return future

    def _next(self, model: LoadedModel) -> None:
        """Start a batch of what waits for ``model`` (up to MAX_BATCH_ROWS rows)."""
        key = id(model)
        waiting = self._waiting.get(key)
        if not waiting:
            self._waiting.pop(key, None)
            self._busy.discard(key)
            return
        batch: list[_Ask] = []
        rows = 0
        while waiting and (not batch or rows + len(waiting[0].entity_ids) <= MAX_BATCH_ROWS):
            ask = waiting.pop(0)
            batch.append(ask)
            rows += len(ask.entity_ids)
        self._busy.add(key)
        task = asyncio.get_running_loop().create_task(self._run(model, batch))
        self._tasks.add(task)
        task.add_done_callback(lambda t: self._done(t, model))

    def _done(self, task: asyncio.Task[None], model: LoadedModel) -> None:
        self._tasks.discard(task)
        self._next(model)

    async def _run(self, model: LoadedModel, asks: list[_Ask]) -> None:
        try:
            self.batches += 1
            ids = [e for a in asks for e in a.entity_ids]
            t_read = time.perf_counter()
            vectors = await self._read(model, ids)
            t_score = time.perf_counter()
            x = feature_matrix([v.values for v in vectors], len(model.mv.provenance.features))
            outputs = model.ort.run_one(x)
            scores = positive_scores(probabilities(model.ort.outputs, outputs))
            t_end = time.perf_counter()
            if model.drift is not None:
                model.drift.observe(x.tolist(), scores)
        except BaseException as exc:
            for a in asks:
                if not a.future.done():
                    a.future.set_exception(copy.copy(exc))
            if not isinstance(exc, Exception):
                raise
            return
        read_us, score_us = int((t_score - t_read) * 1e6), int((t_end - t_score) * 1e6)
        at = 0
        for a in asks:
            n = len(a.entity_ids)
            if not a.future.done():  # a cancelled request (its deadline passed) is skipped
                a.future.set_result(
                    Scored(
                        vectors[at : at + n], x[at : at + n], scores[at : at + n], read_us, score_us
                    )
                )
            at += n

    async def _read(self, model: LoadedModel, entity_ids: list[str]) -> list[EntityVector]:
        """Features from the view version the model was trained on (its provenance pins
        ``view@hash``): a newer served version of the view never skews an older model."""
        prov = model.mv.provenance
        pinned = pinned_version(prov.feature_view, prov.feature_views)
        try:
            return await self._reader.read(
                prov.feature_view, entity_ids, list(prov.features), version=pinned or None
            )
        except UnknownView as exc:
            raise FeaturesUnavailable(
                f"model {model.mv.name} v{model.version} reads {prov.feature_view}"
                + (f"@{pinned}" if pinned else "")
                + f", which the online store does not have: {exc}"
            ) from None

    async def close(self) -> None:
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
