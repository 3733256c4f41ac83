"""Online/offline consistency check.

For a sample of entities, read the online vector and the event sequence it was computed
at, recompute the same view offline from ClickHouse's raw history up to that sequence
(same window engine, same event order, the same rules: the first copy of an event id
counts, and an event too far behind its partition's watermark is late), and report every
feature that differs. Entities whose online values are withheld (EXPIRED) are reported as
not compared, never as matches; a check that compared nothing says so.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import pyarrow as pa

from myelin.contracts import ContractRegistry
from myelin.online import OnlineReader, Status
from myelin.warehouse import DATABASE
from services.features.logic import EntityState, WindowEngine

Query = Callable[[str], Awaitable[pa.Table]]


class CheckRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    sample: int = 100
    tolerance: float = 1e-9
    view: str = ""  # NAME@HASH, NAME (its served version) or '' (the primary view)


def _same(a: float, b: float, tol: float) -> bool:
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return abs(a - b) <= tol * max(1.0, abs(a), abs(b))


async def check(
    req: CheckRequest,
    engine: WindowEngine,
    registry: ContractRegistry,
    reader: OnlineReader,
    query: Query,
    wait_stored: Callable[[int], Awaitable[None]],
) -> dict[str, Any]:
    """``wait_stored(stream_seq)`` returns once raw history is stored up to that sequence."""
    view = engine.view
    sources = ", ".join(f"'{s}'" for s in view.sources)
    sample = max(1, min(req.sample, 10_000))
    lateness_ms = view.allowed_lateness_s * 1000
    ents = (
        (
            await query(
                f"SELECT entity_id FROM {DATABASE}.events FINAL WHERE type IN ({sources}) "
                f"GROUP BY entity_id ORDER BY cityHash64(entity_id) LIMIT {sample}"
            )
        )
        .column("entity_id")
        .to_pylist()
    )
    if not ents:
        return {
            "checked": 0,
            "matched": 0,
            "mismatches": [],
            "missing_online": 0,
            "expired_online": 0,
            "sampled": 0,
        }
    vectors = {
        v.entity_id: v for v in await reader.read(view.name, ents, version=view.content_hash)
    }
    await wait_stored(max(v.seq for v in vectors.values()) // 1000)  # event seq -> stream seq
    quoted = ", ".join("'" + e.replace("'", "''") + "'" for e in ents)
    # Each event once (its first copy on the stream: a resent copy was a duplicate), with
    # its partition's watermark as the pipeline saw it: the newest event time of the view's
    # events earlier on the stream in that partition.
    rows = (
        await query(
            f"""SELECT entity_id, event_id, type, schema_version, event_time, stream_seq, data,
                   toUnixTimestamp64Milli(partition_watermark) AS pwm
            FROM (
                SELECT *, max(event_time) OVER (PARTITION BY partition ORDER BY stream_seq
                    ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) AS partition_watermark
                FROM (SELECT entity_id, event_id, type, schema_version, event_time, stream_seq,
                             data, partition
                      FROM {DATABASE}.events WHERE type IN ({sources})
                      ORDER BY stream_seq LIMIT 1 BY event_id))
            WHERE entity_id IN ({quoted}) ORDER BY entity_id, stream_seq"""
        )
    ).to_pylist()
    history: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        history.setdefault(r["entity_id"], []).append(r)
    mismatches: list[dict[str, Any]] = []
    checked = missing = expired = 0
    for e in ents:
        online = vectors[e]
        if online.status == Status.MISSING:
            missing += 1
            continue
        if online.status == Status.EXPIRED:
            expired += 1  # values withheld on read: nothing to compare
            continue
        st = EntityState()
        for r in history.get(e, []):
            if r["stream_seq"] > online.seq:
                break
            contract = registry.get(r["type"], r["schema_version"])
            if contract is None:
                continue  # the pipeline dead-lettered it
            event_time = int(r["event_time"].timestamp() * 1000)
            if event_time < r["pwm"] - lateness_ms:
                engine.mark_late(st, r["stream_seq"])
                continue
            payload = contract.json_decoder.decode(r["data"])
            engine.apply(st, r["stream_seq"], r["type"], event_time, payload, r["event_id"])
        offline = engine.vector(st)
        checked += 1
        for name, value in zip(view.feature_names, online.values, strict=True):
            if not _same(value, offline[name], req.tolerance):
                mismatches.append(
                    {
                        "entity_id": e,
                        "feature": name,
                        "online": value,
                        "offline": offline[name],
                        "seq": online.seq,
                    }
                )
    return {
        "checked": checked,  # compared feature by feature
        "matched": checked - len({m["entity_id"] for m in mismatches}),
        "mismatches": mismatches[:1000],
        "missing_online": missing,
        "expired_online": expired,
        "sampled": len(ents),
    }
