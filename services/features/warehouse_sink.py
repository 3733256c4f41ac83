"""Outbound adapter: batches of rows -> Arrow -> ClickHouse (chdb or server).

chdb is one engine in this process: every call runs on one worker thread, so the event
loop never blocks on it and calls never interleave.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import msgspec
import pyarrow as pa

from myelin.contracts import StreamEvent
from myelin.records import AuditRecord, DeadLetter, InferenceRecord
from myelin.warehouse import DATABASE, Warehouse

T = TypeVar("T")
TS = pa.timestamp("ms", tz="UTC")
FMAP = pa.map_(pa.string(), pa.float64())
_json = msgspec.json.Encoder()


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


def events_table(decoded: list[tuple[int, StreamEvent, Any]], late: set[int]) -> pa.Table:
    """Raw history, one row per ``(event_seq, event, payload)``; ``late`` holds event seqs."""
    evs = [ev for _, ev, _ in decoded]
    seqs = [seq for seq, _, _ in decoded]
    json = _json.encode
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
            "stream_seq": pa.array(seqs, pa.uint64()),
            "late": pa.array(
                [1 if s in late else 0 for s in seqs] if late else [0] * len(seqs), pa.uint8()
            ),
            "data": pa.array([json(d).decode() for _, _, d in decoded], pa.string()),
        }
    )


def feature_values_table(
    view: str,
    view_hash: str,
    names: tuple[str, ...],
    rows: list[tuple[str, int, int, str]],
    values: list[float],
) -> pa.Table:
    """One row per ``(entity, as_of, event seq, trace)``; ``values`` holds each row's
    vector, in ``names`` order, back to back."""
    n, width = len(rows), len(names)
    offsets = pa.array(range(0, n * width + 1, width), pa.int32())
    keys = pa.DictionaryArray.from_arrays(
        pa.array(list(range(width)) * n, pa.int32()), pa.array(names, pa.string())
    ).cast(pa.string())
    return pa.table(
        {
            "view": pa.array([view] * n, pa.string()),
            "view_hash": pa.array([view_hash] * n, pa.string()),
            "entity_id": pa.array([r[0] for r in rows], pa.string()),
            "as_of": pa.array([r[1] for r in rows], TS),
            "stream_seq": pa.array([r[2] for r in rows], pa.uint64()),
            "trace_id": pa.array([r[3] for r in rows], pa.string()),
            "values": pa.MapArray.from_arrays(offsets, keys, pa.array(values, pa.float64())),
        }
    )


def inferences_table(records: list[InferenceRecord]) -> pa.Table:
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
        )
    }
    for r in records:
        preds = r.predictions
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
            ):
                cols[k].append(v)
    types = {
        "row": pa.uint32(),
        "ts": TS,
        "score": pa.float64(),
        "features": FMAP,
        "feature_age_ms": pa.int64(),
        "latency_us": pa.uint32(),
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
        }
    )
