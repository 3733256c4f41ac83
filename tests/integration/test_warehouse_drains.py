"""The warehouse's drains on real streams and a real ClickHouse (chdb): raw history, late
marks, offline feature values; a redelivered batch changes nothing."""

from __future__ import annotations

import re
import time

import msgspec
import pytest
from nats.aio.client import Client as NATS

from myelin import bus
from myelin.consume import PoisonMessages
from myelin.contracts import StreamEvent
from myelin.records import (
    ColumnDrift,
    DriftDetected,
    FeatureRow,
    FeatureRows,
    InferenceRecord,
    Prediction,
)
from myelin.settings import Settings
from myelin.subjects import DRIFT_STREAM, EVENTS_STREAM, FEATURES_STREAM, LATE_STREAM
from myelin.warehouse import DDL, Warehouse, keep_rank, migrate
from services.warehouse.drains import (
    SEQS_HEADER,
    drift_drain,
    events_drain,
    features_drain,
    late_drain,
)
from services.warehouse.retention import ttl_days
from services.warehouse.sink import WarehouseSink, events_table, inferences_table

pytestmark = pytest.mark.integration
_mp = msgspec.msgpack.Encoder()


def ev(i: int, t: int) -> StreamEvent:
    return StreamEvent(
        event_id=f"w{i}",
        type="purchase",
        schema_version=1,
        event_time=t + i,
        ingest_time=t,
        producer_id="p",
        client_version="",
        trace_id=f"{i:032x}",
        entity_id=f"u{i % 3}",
        partition=0,
        data=msgspec.Raw(_mp.encode({"user_id": f"u{i % 3}", "item_id": "x", "amount": 2.5})),
    )


async def fetch_all(nc: NATS, settings: Settings, stream: str, subject: str) -> list[object]:
    js = bus.jetstream(nc, settings)
    n = (await js.stream_info(stream)).state.messages
    sub = await js.pull_subscribe(subject, stream=stream)
    msgs = await sub.fetch(n, timeout=2)
    await sub.unsubscribe()
    return list(msgs)


async def test_drains_store_raw_history_late_marks_and_feature_values_once(
    nc: NATS, settings: Settings, warehouse: Warehouse
) -> None:
    js = bus.jetstream(nc, settings)
    t = int(time.time() * 1000)
    await js.publish("myelin.events.0", _mp.encode([ev(0, t), ev(1, t)]))
    await js.publish("myelin.events.1", _mp.encode([ev(2, t)]))
    # a view found w1 (event seq 1001) too late
    await js.publish("myelin.late.v", _mp.encode([ev(1, t)]), headers={SEQS_HEADER: "1001"})
    rows = FeatureRows(
        view="v",
        version="abc",
        features=["n", "s"],
        rows=[
            FeatureRow("u0", t, 1000, "00", [1.0, 2.5]),
            FeatureRow("u2", t, 2000, "02", [1.0, 2.5]),
        ],
    )
    await js.publish("myelin.features.v.abc", _mp.encode(rows))

    sink = WarehouseSink(warehouse)
    try:
        events = await fetch_all(nc, settings, EVENTS_STREAM, "myelin.events.>")
        late = await fetch_all(nc, settings, LATE_STREAM, "myelin.late.>")
        feats = await fetch_all(nc, settings, FEATURES_STREAM, "myelin.features.>")
        for _ in range(2):  # a redelivery stores nothing new
            await events_drain(sink)(events)  # type: ignore[arg-type]
            await late_drain(sink)(late)  # type: ignore[arg-type]
            await features_drain(sink)(feats)  # type: ignore[arg-type]
    finally:
        sink._pool.shutdown(wait=True)
    got = warehouse.query_arrow(
        "SELECT event_id, stream_seq, late, JSONExtractFloat(data, 'amount') AS amount "
        "FROM myelin.events FINAL ORDER BY stream_seq"
    ).to_pylist()
    assert got == [
        {"event_id": "w0", "stream_seq": 1000, "late": 0, "amount": 2.5},
        {"event_id": "w1", "stream_seq": 1001, "late": 1, "amount": 2.5},
        {"event_id": "w2", "stream_seq": 2000, "late": 0, "amount": 2.5},
    ]
    fv = warehouse.query_arrow(
        "SELECT entity_id, view_hash, values['s'] AS s FROM myelin.feature_values FINAL "
        "ORDER BY entity_id"
    ).to_pylist()
    assert fv == [
        {"entity_id": "u0", "view_hash": "abc", "s": 2.5},
        {"entity_id": "u2", "view_hash": "abc", "s": 2.5},
    ]


def test_raw_history_keeps_the_copy_that_counted(warehouse: Warehouse) -> None:
    """An event stored twice on the stream (seq 1000, and resent at 5000, which a view then
    found late): raw history keeps the first copy, whatever merges did. On main the late
    resent copy replaced the copy the pipeline had applied."""
    t = int(time.time() * 1000)
    first, again = (1000, ev(1, t)), (5000, ev(1, t))
    warehouse.insert_arrow("myelin.events", events_table([again], late=True))
    warehouse.insert_arrow("myelin.events", events_table([first]))
    warehouse.insert_arrow("myelin.events", events_table([again]))
    warehouse.command("OPTIMIZE TABLE myelin.events FINAL")
    rows = warehouse.query_arrow("SELECT stream_seq, late FROM myelin.events").to_pylist()
    assert rows == [{"stream_seq": 1000, "late": 0}]


def test_raw_history_of_an_earlier_build_is_migrated(warehouse: Warehouse) -> None:
    """Tables versioned by ``late`` alone are moved into the current table at start."""
    old = next(s for s in DDL if ".events (" in s)
    old = old.replace(",\n        keep_rank UInt64", "").replace(
        "ReplacingMergeTree(keep_rank)", "ReplacingMergeTree(late)"
    )
    old = re.sub(r"\n\s*TTL .*", "", old)  # earlier builds had no retention
    warehouse.command("DROP TABLE myelin.events")
    warehouse.command(old)
    t = int(time.time() * 1000)
    legacy = events_table([(1000, ev(1, t)), (2000, ev(2, t))]).drop_columns(["keep_rank"])
    warehouse.insert_arrow("myelin.events", legacy)
    try:
        assert migrate(warehouse) and not migrate(warehouse)  # once
        rows = warehouse.query_arrow(
            "SELECT event_id, stream_seq, keep_rank FROM myelin.events ORDER BY stream_seq"
        ).to_pylist()
        assert [(r["event_id"], r["stream_seq"]) for r in rows] == [("w1", 1000), ("w2", 2000)]
        assert [r["keep_rank"] for r in rows] == [keep_rank(1000, False), keep_rank(2000, False)]
        # the migration keeps the old table's retention (none): changing it is governed
        engine = warehouse.query_arrow(
            "SELECT engine_full FROM system.tables WHERE database = 'myelin' AND name = 'events'"
        ).to_pylist()[0]["engine_full"]
        assert ttl_days(str(engine)) == 0
        warehouse.command(
            "ALTER TABLE myelin.events MODIFY TTL toDateTime(ingest_time) + INTERVAL 400 DAY"
        )
    finally:  # leave the current table for the other tests, whatever happened
        warehouse.command("DROP TABLE IF EXISTS myelin.events_v1")
        if (
            "ReplacingMergeTree(late)"
            in warehouse.query_arrow(
                "SELECT engine_full FROM system.tables WHERE database = 'myelin' AND name = 'events'"
            )
            .column("engine_full")
            .to_pylist()[0]
        ):
            warehouse.command("DROP TABLE myelin.events")
            warehouse.command(next(s for s in DDL if ".events (" in s))


def _inference(request_id: str, ts_ms: int) -> InferenceRecord:
    return InferenceRecord(
        request_id=request_id,
        ts_ms=ts_ms,
        api="predict",
        model="ctr",
        model_version="1",
        alias="champion",
        latency_us=900,
        trace_id="",
        route="champion",
        read_us=300,
        score_us=200,
        predictions=[Prediction("u1", 0.5, {"f": 1.0}, 10, "FRESH", "")],
        rows=1,
    )


def test_the_ledger_keeps_one_row_per_request_and_entity(warehouse: Warehouse) -> None:
    """A request id recorded again (another replica, a retry after a restart) collapses:
    the ledger is keyed on (model, request id, row), not on the time it was recorded."""
    t = int(time.time() * 1000)
    warehouse.insert_arrow("myelin.inferences", inferences_table([_inference("r1", t)]))
    warehouse.insert_arrow("myelin.inferences", inferences_table([_inference("r1", t + 5000)]))
    rows = warehouse.query_arrow(
        "SELECT request_id, route, read_us, score_us FROM myelin.inferences FINAL"
    ).to_pylist()
    assert rows == [{"request_id": "r1", "route": "champion", "read_us": 300, "score_us": 200}]
    # a shadow's scores of a request become rows beside the champion's
    shadowed = msgspec.structs.replace(
        _inference("r2", t), shadow_version="2", shadow_scores=[0.25], shadow_us=40
    )
    warehouse.insert_arrow("myelin.inferences", inferences_table([shadowed]))
    rows = warehouse.query_arrow(
        "SELECT route, model_version, score, features, score_us FROM myelin.inferences FINAL "
        "WHERE request_id = 'r2' ORDER BY route"
    ).to_pylist()
    assert rows == [
        {
            "route": "champion",
            "model_version": "1",
            "score": 0.5,
            "features": [("f", 1.0)],
            "score_us": 200,
        },
        {
            "route": "shadow",
            "model_version": "2",
            "score": 0.25,
            "features": [("f", 1.0)],
            "score_us": 40,
        },
    ]


def test_a_ledger_of_an_earlier_build_is_migrated(warehouse: Warehouse) -> None:
    create = next(s for s in DDL if ".inferences (" in s)
    old = (
        create.split("        route LowCardinality(String)")[0].rstrip().rstrip(",")
        + "\n    ) ENGINE = ReplacingMergeTree\n    ORDER BY (model, ts, request_id, row)"
    )
    warehouse.command("DROP TABLE myelin.inferences")
    warehouse.command(old)
    legacy = inferences_table([_inference("r1", int(time.time() * 1000))]).drop_columns(
        ["route", "read_us", "score_us", "inputs", "outputs"]
    )
    warehouse.insert_arrow("myelin.inferences", legacy)
    try:
        assert migrate(warehouse) and not migrate(warehouse)
        [row] = warehouse.query_arrow(
            "SELECT request_id, entity_id, route FROM myelin.inferences"
        ).to_pylist()
        assert row == {"request_id": "r1", "entity_id": "u1", "route": "champion"}
    finally:  # leave the current table for the other tests, whatever happened
        warehouse.command("DROP TABLE IF EXISTS myelin.inferences_v1")
        warehouse.command("DROP TABLE IF EXISTS myelin.inferences")
        warehouse.command(create)


def test_a_ledger_keyed_without_the_route_is_migrated(warehouse: Warehouse) -> None:
    create = next(s for s in DDL if ".inferences (" in s)
    warehouse.command("DROP TABLE myelin.inferences")
    warehouse.command(
        create.replace(
            "ORDER BY (model, request_id, route, row)", "ORDER BY (model, request_id, row)"
        )
    )
    warehouse.insert_arrow(
        "myelin.inferences", inferences_table([_inference("r1", int(time.time() * 1000))])
    )
    try:
        assert migrate(warehouse) and not migrate(warehouse)
        [row] = warehouse.query_arrow(
            "SELECT request_id, route, read_us FROM myelin.inferences"
        ).to_pylist()
        assert row == {"request_id": "r1", "route": "champion", "read_us": 300}
        key = warehouse.query_arrow(
            "SELECT sorting_key FROM system.tables WHERE database = 'myelin' AND name = 'inferences'"
        ).to_pylist()[0]["sorting_key"]
        assert key == "model, request_id, route, row"
    finally:
        warehouse.command("DROP TABLE IF EXISTS myelin.inferences_v2")
        warehouse.command("DROP TABLE IF EXISTS myelin.inferences")
        warehouse.command(create)


async def test_drift_records_are_stored_per_column_and_garbage_is_named(
    nc: NATS, settings: Settings, warehouse: Warehouse
) -> None:
    js = bus.jetstream(nc, settings)
    t = int(time.time() * 1000)
    cols = [
        ColumnDrift(feature=f, samples=600, psi=p, js=0.05, wasserstein=0.02, ks=0.04, breached=b)
        for f, p, b in (("clicks_1h", 0.31, ["psi"]), ("__score__", 0.01, []))
    ]
    record = DriftDetected(
        drift_id=f"ctr:v1:{t}",
        ts_ms=t + 60_000,
        model="ctr",
        model_version="1",
        window_start_ms=t,
        window_end_ms=t + 60_000,
        samples=600,
        drifted=["clicks_1h"],
        columns=cols,
        thresholds={"min_samples": 500.0, "psi": 0.2},
    )
    await js.publish("myelin.drift.ctr", _mp.encode(record))
    await js.publish("myelin.drift.ctr", b"\xc1 not msgpack")
    msgs = await fetch_all(nc, settings, DRIFT_STREAM, "myelin.drift.>")
    sink = WarehouseSink(warehouse)
    try:
        with pytest.raises(PoisonMessages) as bad:
            await drift_drain(sink)(msgs)  # type: ignore[arg-type]
        assert bad.value.msgs == [msgs[1]]  # the loop dead-letters it, retries the rest
        for _ in range(2):  # the rest, and a redelivery of it: stored once
            await drift_drain(sink)(msgs[:1])  # type: ignore[arg-type]
    finally:
        sink._pool.shutdown(wait=True)
    rows = warehouse.query_arrow(
        "SELECT feature, samples, psi, breached, thresholds['psi'] AS psi_threshold "
        "FROM myelin.drift_events FINAL ORDER BY feature"
    ).to_pylist()
    assert rows == [
        {"feature": "__score__", "samples": 600, "psi": 0.01, "breached": [], "psi_threshold": 0.2},
        {
            "feature": "clicks_1h",
            "samples": 600,
            "psi": 0.31,
            "breached": ["psi"],
            "psi_threshold": 0.2,
        },
    ]
