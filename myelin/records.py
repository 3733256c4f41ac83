"""Records published on the INFERENCES and AUDIT streams (msgpack). Append-only evolution."""

from __future__ import annotations

import msgspec


class Prediction(msgspec.Struct, frozen=True, array_like=True):
    entity_id: str
    score: float
    features: dict[str, float]
    feature_age_ms: int
    feature_status: str
    source_trace_id: str


class InferenceRecord(msgspec.Struct, frozen=True, kw_only=True):
    """One inference request (one or many rows). Each message on the INFERENCES stream is
    a msgpack list of these: the recorder publishes them in batches."""

    request_id: str
    ts_ms: int
    api: str  # "predict" | "oip"
    model: str
    model_version: str
    alias: str
    latency_us: int
    trace_id: str
    predictions: list[Prediction] = []
    rows: int = 0


class AuditRecord(msgspec.Struct, frozen=True, kw_only=True):
    """One governance decision with its inputs and the policy version that made it."""

    decision_id: str
    ts_ms: int
    action: str
    subject: str
    allow: bool
    reasons: list[str]
    policy_version: str
    input_json: str
    trace_id: str
    cached: bool = False


class DeadLetter(msgspec.Struct, frozen=True, kw_only=True):
    """A rejected event with a machine-readable reason."""

    reason: str
    message: str
    producer_id: str
    event_id: str
    ts_ms: int
    detail: dict[str, str] = {}
    payload: str = ""  # original event text (PII already tokenized, when it could be parsed)
