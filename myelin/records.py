"""Records published on the FEATURES, INFERENCES, AUDIT and DLQ streams (msgpack).
Append-only evolution."""

from __future__ import annotations

import msgspec

from myelin.contracts.envelope import StreamEvent


class Prediction(msgspec.Struct, frozen=True, array_like=True):
    entity_id: str
    score: float
    features: dict[str, float]
    feature_age_ms: int
    feature_status: str
    source_trace_id: str


class TensorRecord(msgspec.Struct, frozen=True, kw_only=True):
    """A tensor as served (an OIP input or output): always its shape, size and a SHA-256 of
    its bytes; its values too, flattened, when it is no larger than the ledger's cap
    (``MYELIN_LEDGER_TENSOR_CAP_BYTES``)."""

    name: str
    datatype: str
    shape: list[int]
    nbytes: int
    sha256: str
    values: list[float | int | bool | str] = []


class InferenceRecord(msgspec.Struct, frozen=True, kw_only=True):
    """One inference request (one or many rows). Each message on the INFERENCES stream is
    a msgpack list of these: the recorder publishes them in batches. A request id is
    recorded once per model."""

    request_id: str
    ts_ms: int
    api: str  # "predict" | "oip"
    model: str
    model_version: str
    alias: str
    latency_us: int  # the whole request, as the server handled it
    trace_id: str
    predictions: list[Prediction] = []
    rows: int = 0
    route: str = ""  # how the version was chosen: the alias ("champion", ...) or "pinned"
    read_us: int = 0  # reading online features (Predict)
    score_us: int = 0  # running the model
    inputs: list[TensorRecord] = []  # OIP: the input tensors as served
    outputs: list[TensorRecord] = []  # OIP: the output tensors returned
    # Predict with a shadow: the shadow version's score of each row, on the same features
    # (the warehouse stores them as rows of route "shadow": see with_shadow_rows)
    shadow_version: str = ""
    shadow_scores: list[float] = []
    shadow_us: int = 0  # the shadow's scoring time (its share of the batch it ran in)


def with_shadow_rows(records: list[InferenceRecord]) -> list[InferenceRecord]:
    """The ledger as stored: each record, and after one with shadow scores the shadow's own
    record (route ``shadow``, the same request id, features, ages and trace)."""
    out: list[InferenceRecord] = []
    for r in records:
        out.append(r)
        if r.shadow_version and len(r.shadow_scores) == len(r.predictions):
            out.append(
                msgspec.structs.replace(
                    r,
                    model_version=r.shadow_version,
                    alias="shadow",
                    route="shadow",
                    read_us=0,
                    score_us=r.shadow_us,
                    latency_us=r.shadow_us,
                    predictions=[
                        msgspec.structs.replace(p, score=s)
                        for p, s in zip(r.predictions, r.shadow_scores, strict=True)
                    ],
                    shadow_version="",
                    shadow_scores=[],
                    shadow_us=0,
                )
            )
    return out


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


class FeatureRow(msgspec.Struct, frozen=True, array_like=True):
    """An entity's feature vector right after one of its events was applied."""

    entity_id: str
    as_of: int  # the entity's event-time watermark, ms
    stream_seq: int  # the event's sequence (stream sequence x 1000 + index in its message)
    trace_id: str
    values: list[float]  # in the message's ``features`` order


class FeatureRows(msgspec.Struct, frozen=True, kw_only=True):
    """Offline feature values of one view version (a message on the FEATURES stream),
    drained into ClickHouse ``feature_values`` by the warehouse."""

    view: str
    version: str  # the view's content hash
    features: list[str]
    rows: list[FeatureRow]


class LateEvents(msgspec.Struct, frozen=True, kw_only=True):
    """Events too late for a view's windows (a message on the LATE stream), with each
    event's sequence (stream sequence x 1000 + index in its message). The sequences travel
    in the payload: a header holding one per event grew past JetStream's 64 KiB limit."""

    view: str
    seqs: list[int]
    events: list[StreamEvent]


class ColumnDrift(msgspec.Struct, frozen=True, kw_only=True):
    """One input feature's (or the score's, ``__score__``) drift figures in a window
    (definitions: :mod:`myelin.drift`)."""

    feature: str
    samples: int
    psi: float
    js: float
    wasserstein: float
    ks: float
    breached: list[str]  # the figures at or over their threshold


class DriftDetected(msgspec.Struct, frozen=True, kw_only=True):
    """A served model version whose inputs or score left their training distribution in a
    window of traffic. One message per breach on ``myelin.drift.<model>`` (msgpack; the
    message id is ``drift_id``), drained into ``myelin.drift_events``."""

    drift_id: str  # "<model>:v<version>:<window_start_ms>"
    ts_ms: int
    model: str
    model_version: str
    window_start_ms: int
    window_end_ms: int
    samples: int  # requests' rows counted in the window
    drifted: list[str]  # the columns with a breach
    columns: list[ColumnDrift]  # every column, breached or not
    thresholds: dict[str, float]  # min_samples and each figure's threshold
