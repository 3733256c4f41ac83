"""The inference use cases, transport-agnostic: feature-aware predict and raw OIP infer."""

from __future__ import annotations

import itertools
import time
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from myelin import telemetry
from myelin.errors import MyelinError
from myelin.online import EntityVector, OnlineReader
from myelin.records import InferenceRecord, Prediction
from services.inference.ledger import tensor_record
from services.inference.logic import (
    TensorError,
    positive_scores,
)
from services.inference.model_host import LoadedModel, ModelHost
from services.inference.predict_batch import PredictBatcher
from services.inference.recorder import Recorder
from services.inference.shadow import ShadowScorer

MAX_ENTITIES = 10_000
# A request arriving sooner than this after the previous one finished was queued behind it
# (a client that waited for its answer needs longer than that to send the next request).
BUSY_GAP_S = 0.0003


class NotFeatureAware(MyelinError):
    code = "not_feature_aware"


@dataclass(frozen=True)
class PredictResult:
    model: LoadedModel
    alias: str
    request_id: str
    vectors: list[EntityVector]
    scores: list[float]
    feature_names: list[str]
    trace_id: str


class Predictor:
    def __init__(
        self,
        host: ModelHost,
        reader: OnlineReader,
        recorder: Recorder,
        tensor_cap_bytes: int = 16 * 1024,
        shadows: ShadowScorer | None = None,
    ) -> None:
        """``tensor_cap_bytes``: the largest OIP tensor the ledger keeps the values of
        (past it: shape, size and SHA-256)."""
        self.host = host
        self.reader = reader
        self.recorder = recorder
        self.tensor_cap_bytes = tensor_cap_bytes
        self.shadows = shadows
        self.batcher = PredictBatcher(reader)
        # ids for requests that bring none: unique per process (a random prefix), cheap
        self._id_prefix = uuid.uuid4().hex[:20]
        self._ids = itertools.count(1)
        self.predictions = 0
        self.requests = 0
        self._active = 0  # Predict calls in progress
        self._finished = 0.0  # when the last one finished

    def _new_id(self) -> str:
        return f"{self._id_prefix}{next(self._ids):012x}"

    async def predict(
        self, name: str, ref: str, entity_ids: list[str], request_id: str
    ) -> PredictResult:
        t0 = time.perf_counter()
        # busy: another request is in progress, or this one came right behind the last
        # (queued in gRPC): a client waiting for its answer takes longer than BUSY_GAP_S
        crowded = self._active > 0 or t0 - self._finished < BUSY_GAP_S
        self._active += 1
        try:
            return await self._predict(name, ref, entity_ids, request_id, t0, crowded)
        finally:
            self._active -= 1
            self._finished = time.perf_counter()

    async def _predict(
        self,
        name: str,
        ref: str,
        entity_ids: list[str],
        request_id: str,
        t0: float,
        crowded: bool,
    ) -> PredictResult:
        if not entity_ids:
            raise TensorError("entity_ids is empty")
        if len(entity_ids) > MAX_ENTITIES:
            raise TensorError(f"{len(entity_ids)} entity ids; at most {MAX_ENTITIES} per request")
        routed = await self.host.route(name, ref, entity_ids[0])
        model, alias = routed.model, routed.alias
        prov = model.mv.provenance
        if not prov.feature_view or not prov.features:
            raise NotFeatureAware(
                f"model {name} v{model.version} has no feature view in its provenance; use ModelInfer"
            )
        part = await self.batcher.score(model, entity_ids, crowded=crowded)
        vectors, scores = part.vectors, part.scores
        t_end = time.perf_counter()
        rid = request_id or self._new_id()
        trace_id = telemetry.trace_id_hex()
        latency_us = int((t_end - t0) * 1e6)
        record = InferenceRecord(
            request_id=rid,
            ts_ms=int(time.time() * 1000),
            api="predict",
            model=name,
            model_version=model.version,
            alias=alias,
            latency_us=latency_us,
            trace_id=trace_id,
            route=routed.route,
            read_us=part.read_us,
            score_us=part.score_us,
            predictions=[
                Prediction(
                    v.entity_id,
                    s,
                    dict(zip(prov.features, v.values, strict=True)),
                    v.age_ms,
                    v.status.value,
                    v.trace_id,
                )
                for v, s in zip(vectors, scores, strict=True)
            ],
            rows=len(entity_ids),
        )
        shadow = routed.shadow
        if (
            shadow is not None
            and self.shadows is not None
            and list(shadow.mv.provenance.features) == list(prov.features)
        ):
            self.shadows.submit(shadow, part.x, record)  # records it, with the shadow's scores
        else:
            if shadow is not None and self.shadows is not None:
                self.shadows.mismatched += 1
            self.recorder.record(record)
        self.requests += 1
        self.predictions += len(entity_ids)
        return PredictResult(model, alias, rid, vectors, scores, list(prov.features), trace_id)

    async def infer(
        self,
        name: str,
        ref: str,
        feeds: dict[str, npt.NDArray[Any]],
        outputs: list[str] | None,
        request_id: str,
    ) -> tuple[LoadedModel, list[tuple[str, Any]]]:
        t0 = time.perf_counter()
        model, alias = await self.host.get(name, ref)
        names = outputs or [o.name for o in model.ort.outputs]
        known = {o.name for o in model.ort.outputs}
        unknown = [n for n in names if n not in known]
        if unknown:
            raise TensorError(f"unknown output(s) {unknown}; the model has {sorted(known)}")
        missing = [i.name for i in model.ort.inputs if i.name not in feeds]
        if missing:
            raise TensorError(f"missing input(s) {missing}")
        extra = [n for n in feeds if n not in {i.name for i in model.ort.inputs}]
        if extra:
            raise TensorError(f"unknown input(s) {extra}")
        t_score = time.perf_counter()
        try:
            results = model.ort.run(feeds, names)
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises plain errors on bad inputs
            raise TensorError(f"the model rejected the inputs: {exc}") from None
        t_end = time.perf_counter()
        rows = int(next(iter(feeds.values())).shape[0]) if feeds else 0
        if model.drift is not None:
            _observe_tensors(model, feeds, results, names)
        cap = self.tensor_cap_bytes
        self.recorder.record(
            InferenceRecord(
                request_id=request_id or self._new_id(),
                ts_ms=int(time.time() * 1000),
                api="oip",
                model=name,
                model_version=model.version,
                alias=alias,
                latency_us=int((t_end - t0) * 1e6),
                trace_id=telemetry.trace_id_hex(),
                rows=rows,
                route=alias or "pinned",
                score_us=int((t_end - t_score) * 1e6),
                inputs=[tensor_record(n, a, cap) for n, a in feeds.items()],
                outputs=[tensor_record(n, r, cap) for n, r in zip(names, results, strict=True)],
            )
        )
        self.requests += 1
        self.predictions += rows
        return model, list(zip(names, results, strict=True))


def _observe_tensors(
    model: LoadedModel,
    feeds: dict[str, npt.NDArray[Any]],
    results: list[Any],
    names: list[str],
) -> None:
    """Drift counts for a ModelInfer whose single input is the [rows, features] matrix the
    reference describes (other signatures are not counted)."""
    assert model.drift is not None
    width = len(model.drift.reference.features)
    if len(feeds) != 1 or "probabilities" not in names:
        return
    x = next(iter(feeds.values()))
    if x.ndim != 2 or x.shape[1] != width or x.dtype.kind != "f":
        return
    p = results[names.index("probabilities")]
    scores = positive_scores(np.asarray(p, dtype=np.float64))
    clean = np.nan_to_num(np.asarray(x, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    model.drift.observe(clean.tolist(), scores)
