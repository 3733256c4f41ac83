"""Outbound adapter: batches of rows -> Arrow -> ClickHouse (chdb or server).

chdb is one engine in this process: every call runs on one worker thread, so the event
loop never blocks on it and calls never interleave.
"""

from __future__ import annotations

import asyncio
import itertools
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import msgspec
import pyarrow as pa

from myelin.contracts import StreamEvent
from myelin.records import (
    AuditRecord,
    DeadLetter,
    DriftDetected,
    FeatureRow,
    FeatureRows,
    InferenceRecord,
    with_shadow_rows,
)
from myelin.warehouse import DATABASE, Warehouse, keep_rank

T = TypeVar("T")
TS = pa.timestamp("ms", tz="UTC")
FMAP = pa.map_(pa.string(), pa.float64())
_json = msgspec.json.Encoder()
_msgpack = msgspec.msgpack.Decoder()


class WarehouseSink:
    def __init__(self, warehouse: Warehouse) -> None:
        self.wh = warehouse
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="warehouse")

    async def run(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def insert(self, table: str, data: pa.Table) -> None:
        await self.run(self.wh.insert_arrow, f"{DATABASE}.{table}", data)

    async def query(self, sql: str) -> pa.Table:
        result: pa.Table = await self.run(self.wh.query_arrow, sql)
        return result

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self.wh.close()


def events_table(events: list[tuple[int, StreamEvent]], late: bool = False) -> pa.Table:
    """Raw history, one row per ``(event_seq, event)``. The payload (msgpack, validated by
    ingest against its contract) is stored as JSON; ``late`` marks events a view found too
    late for its windows. Of the rows of one event, ClickHouse keeps the highest
    ``keep_rank``: the first copy on the stream, late-marked if it was late."""
    evs = [ev for _, ev in events]
    n = len(evs)
    return pa.table(
        {
            "event_id": pa.array([e.event_id for e in evs], pa.string()),
            "type": pa.array([e.type for e in evs], pa.string()),
            "schema_version": pa.array([e.schema_version for e in evs], pa.uint16()),
            "entity_id": pa.array([e.entity_id for e in evs], pa.string()),
            "event_time": pa.array([e.event_time for e in evs], TS),
            "ingest_time": pa.array([e.ingest_time for e in evs], TS),
            "producer_id": pa.array([e.producer_id for e in evs], pa.string()),
            "trace_id": pa.array([e.trace_id for e in evs], pa.string()),
            "partition": pa.array([e.partition for e in evs], pa.uint16()),
            "stream_seq": pa.array([seq for seq, _ in events], pa.uint64()),
            "late": pa.array([int(late)] * n, pa.uint8()),
            "data": pa.array([_payload_json(e.data) for e in evs], pa.string()),
            "keep_rank": pa.array([keep_rank(seq, late) for seq, _ in events], pa.uint64()),
        }
    )


def _payload_json(raw: msgspec.Raw) -> str:
    try:
        return _json.encode(_msgpack.decode(raw)).decode()
    except (msgspec.MsgspecError, RecursionError):
        return ""  # ingest validated it; an undecodable payload is kept as an empty document


def feature_values_table(batches: list[FeatureRows]) -> pa.Table:
    """One row per feature vector, from FEATURES stream messages."""
    views: list[str] = []
    hashes: list[str] = []
    rows: list[FeatureRow] = []
    keys: list[pa.Array] = []
    for b in batches:
        views.extend([b.view] * len(b.rows))
        hashes.extend([b.version] * len(b.rows))
        rows.extend(b.rows)
        names = pa.array(b.features, pa.string())
        index = pa.array([i for r in b.rows for i in range(len(r.values))], pa.int32())
        keys.append(names.take(index))
    lengths = [len(r.values) for r in rows]
    offsets = pa.array([0, *itertools.accumulate(lengths)], pa.int32())
    flat = pa.array([v for r in rows for v in r.values], pa.float64())
    key_array = pa.concat_arrays(keys) if keys else pa.array([], pa.string())
    return pa.table(
        {
            "view": pa.array(views, pa.string()),
            "view_hash": pa.array(hashes, pa.string()),
            "entity_id": pa.array([r.entity_id for r in rows], pa.string()),
            "as_of": pa.array([r.as_of for r in rows], TS),
            "stream_seq": pa.array([r.stream_seq for r in rows], pa.uint64()),
            "trace_id": pa.array([r.trace_id for r in rows], pa.string()),
            "values": pa.MapArray.from_arrays(offsets, key_array, flat),
        }
    )


def inferences_table(records: list[InferenceRecord]) -> pa.Table:
    """Ledger rows: one per prediction (OIP: per request), the shadow's beside them."""
    records = with_shadow_rows(records)
    cols: dict[str, list[Any]] = {
        k: []
        for k in (
            "request_id",
            "row",
            "ts",
            "api",
            "model",
            "model_version",
            "alias",
            "entity_id",
            "score",
            "features",
            "feature_age_ms",
            "feature_status",
            "latency_us",
            "trace_id",
            "source_trace_id",
            "route",
            "read_us",
            "score_us",
            "inputs",
            "outputs",
        )
    }
    for r in records:
        preds = r.predictions
        inputs = _json.encode(r.inputs).decode() if r.inputs else ""
        outputs = _json.encode(r.outputs).decode() if r.outputs else ""
        stages = (
            ("route", r.route or r.alias),
            ("read_us", r.read_us),
            ("score_us", r.score_us),
            ("inputs", inputs),
            ("outputs", outputs),
        )
        for i, p in enumerate(preds):
            for k, v in (
                ("request_id", r.request_id),
                ("row", i),
                ("ts", r.ts_ms),
                ("api", r.api),
                ("model", r.model),
                ("model_version", r.model_version),
                ("alias", r.alias),
                ("entity_id", p.entity_id),
                ("score", p.score),
                ("features", list(p.features.items())),
                ("feature_age_ms", p.feature_age_ms),
                ("feature_status", p.feature_status),
                ("latency_us", r.latency_us),
                ("trace_id", r.trace_id),
                ("source_trace_id", p.source_trace_id),
                *stages,
            ):
                cols[k].append(v)
        if not preds:  # raw OIP inference: one row per request, no entity
            for k, v in (
                ("request_id", r.request_id),
                ("row", 0),
                ("ts", r.ts_ms),
                ("api", r.api),
                ("model", r.model),
                ("model_version", r.model_version),
                ("alias", r.alias),
                ("entity_id", ""),
                ("score", float("nan")),
                ("features", []),
                ("feature_age_ms", -1),
                ("feature_status", f"rows={r.rows}"),
                ("latency_us", r.latency_us),
                ("trace_id", r.trace_id),
                ("source_trace_id", ""),
                *stages,
            ):
                cols[k].append(v)
    types = {
        "row": pa.uint32(),
        "ts": TS,
        "score": pa.float64(),
        "features": FMAP,
        "feature_age_ms": pa.int64(),
        "latency_us": pa.uint32(),
        "read_us": pa.uint32(),
        "score_us": pa.uint32(),
    }
    return pa.table({k: pa.array(v, types.get(k, pa.string())) for k, v in cols.items()})


def audit_table(records: list[AuditRecord]) -> pa.Table:
    return pa.table(
        {
            "decision_id": pa.array([r.decision_id for r in records], pa.string()),
            "ts": pa.array([r.ts_ms for r in records], TS),
            "action": pa.array([r.action for r in records], pa.string()),
            "subject": pa.array([r.subject for r in records], pa.string()),
            "allow": pa.array([int(r.allow) for r in records], pa.uint8()),
            "reasons": pa.array([r.reasons for r in records], pa.list_(pa.string())),
            "policy_version": pa.array([r.policy_version for r in records], pa.string()),
            "input": pa.array([r.input_json for r in records], pa.string()),
            "trace_id": pa.array([r.trace_id for r in records], pa.string()),
            "cached": pa.array([int(r.cached) for r in records], pa.uint8()),
        }
    )


def drift_table(records: list[DriftDetected]) -> pa.Table:
    """One row per column (input feature or ``__score__``) of each DriftDetected record."""
    rows = [(r, c) for r in records for c in r.columns]
    return pa.table(
        {
            "drift_id": pa.array([r.drift_id for r, _ in rows], pa.string()),
            "ts": pa.array([r.ts_ms for r, _ in rows], TS),
            "model": pa.array([r.model for r, _ in rows], pa.string()),
            "model_version": pa.array([r.model_version for r, _ in rows], pa.string()),
            "window_start": pa.array([r.window_start_ms for r, _ in rows], TS),
            "window_end": pa.array([r.window_end_ms for r, _ in rows], TS),
            "samples": pa.array([c.samples for _, c in rows], pa.uint64()),
            "feature": pa.array([c.feature for _, c in rows], pa.string()),
            "psi": pa.array([c.psi for _, c in rows], pa.float64()),
            "js": pa.array([c.js for _, c in rows], pa.float64()),
            "wasserstein": pa.array([c.wasserstein for _, c in rows], pa.float64()),
            "ks": pa.array([c.ks for _, c in rows], pa.float64()),
            "breached": pa.array([c.breached for _, c in rows], pa.list_(pa.string())),
            "thresholds": pa.array(
                [list(r.thresholds.items()) for r, _ in rows], pa.map_(pa.string(), pa.float64())
            ),
        }
    )


def dead_letters_table(records: list[tuple[int, DeadLetter]]) -> pa.Table:
    return pa.table(
        {
            "event_id": pa.array([r.event_id for _, r in records], pa.string()),
            "ts": pa.array([r.ts_ms for _, r in records], TS),
            "reason": pa.array([r.reason for _, r in records], pa.string()),
            "message": pa.array([r.message for _, r in records], pa.string()),
            "producer_id": pa.array([r.producer_id for _, r in records], pa.string()),
            "payload": pa.array([r.payload for _, r in records], pa.string()),
            "stream_seq": pa.array([s for s, _ in records], pa.uint64()),
            # where a consumer's dead letter came from: stream, seq, consumer, subject
            "detail": pa.array(
                [list(r.detail.items()) for _, r in records], pa.map_(pa.string(), pa.string())
            ),
        }
    )
