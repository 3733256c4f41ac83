from __future__ import annotations

import datetime as dt

import numpy as np
import pyarrow as pa
import pytest

from myelin.training import training_set_sql
from myelin.warehouse import Warehouse, arrow_to_ipc, read_only_sql
from tests.helpers import RECENT_DAY_MS

pytestmark = pytest.mark.integration
TS = pa.timestamp("ms", tz="UTC")


def test_point_in_time_join_matches_a_hand_computed_case(warehouse: Warehouse) -> None:
    # Feature values for entity a change at t=10, 20, 30; for b at t=15 (seconds after B,
    # a recent day: the table's retention would drop rows of 1970)
    B = RECENT_DAY_MS
    fv = pa.table(
        {
            "view": ["v"] * 4,
            "view_hash": ["h"] * 4,
            "entity_id": ["a", "a", "a", "b"],
            "as_of": pa.array([B + 10_000, B + 20_000, B + 30_000, B + 15_000], TS),
            "stream_seq": pa.array([1, 2, 3, 4], pa.uint64()),
            "trace_id": [""] * 4,
            "values": pa.array(
                [[("x", 1.0)], [("x", 2.0)], [("x", 3.0)], [("x", 7.0)]],
                pa.map_(pa.string(), pa.float64()),
            ),
        }
    )
    warehouse.insert_arrow("myelin.feature_values", fv)
    warehouse.insert_arrow("myelin.feature_values", fv)  # a replayed batch must not duplicate rows
    s = B // 1000
    labels = f"""SELECT * FROM VALUES('entity_id String, ts DateTime64(3, \\'UTC\\'), label UInt8',
        ('a', {s + 5}, 0), ('a', {s + 20}, 1), ('a', {s + 25}, 0), ('a', {s + 99}, 1),
        ('b', {s + 15}, 1), ('b', {s + 16}, 0), ('c', {s + 50}, 1))"""
    # VALUES reads DateTime64 from seconds
    table = warehouse.query_arrow(training_set_sql("v", ["x"], labels))
    got = [(r["entity_id"], int(r["ts"].timestamp()) - s, r["x"]) for r in table.to_pylist()]
    assert got == [
        ("a", 5, 0.0),  # nothing before t=5: reads 0
        ("b", 15, 0.0),  # b's first value is at 15 exactly: not visible at 15
        ("b", 16, 7.0),
        ("a", 20, 1.0),  # strictly before 20: the t=10 value, not the t=20 one
        ("a", 25, 2.0),
        ("c", 50, 0.0),  # unknown entity
        ("a", 99, 3.0),
    ]
    assert table.column("features_as_of").to_pylist()[4] == dt.datetime.fromtimestamp(
        s + 20, tz=dt.UTC
    )


def _tied_feature_rows(
    rng: np.random.Generator, entities: int, groups: int
) -> tuple[list[tuple[str, int, int, float]], dict[tuple[str, int], float]]:
    """Rows ``(entity, as_of ms, stream_seq, x)``: per entity ``groups`` distinct as_of,
    each shared by 2-7 rows, and the value the newest row (greatest stream_seq) holds."""
    rows: list[tuple[str, int, int, float]] = []
    newest: dict[tuple[str, int], float] = {}
    seq = 1_000
    for e in range(entities):
        entity = f"u{e:03d}"
        as_of = RECENT_DAY_MS + int(rng.integers(0, 1000))
        for _ in range(groups):
            as_of += int(rng.integers(2, 5_000))  # labels at as_of + 1 stay apart
            for _ in range(int(rng.integers(2, 8))):
                seq += int(rng.integers(1, 3_000))  # a gap: other entities' events
                x = float(rng.integers(1, 1_000_000))
                rows.append((entity, as_of, seq, x))
                newest[(entity, as_of)] = x  # rows are generated in stream order
    return rows, newest


def _fv_table(rows: list[tuple[str, int, int, float]], version: str = "ab12") -> pa.Table:
    n = len(rows)
    return pa.table(
        {
            "view": ["v"] * n,
            "view_hash": [version] * n,
            "entity_id": [r[0] for r in rows],
            "as_of": pa.array([r[1] for r in rows], TS),
            "stream_seq": pa.array([r[2] for r in rows], pa.uint64()),
            "trace_id": [""] * n,
            "values": pa.array([[("x", r[3])] for r in rows], pa.map_(pa.string(), pa.float64())),
        }
    )


LABELS_TABLE = "myelin.test_tie_labels"


def test_tied_as_of_rows_resolve_to_the_newest_and_the_result_is_reproducible(
    warehouse: Warehouse,
) -> None:
    rng = np.random.default_rng(7)
    rows, newest = _tied_feature_rows(rng, entities=60, groups=25)
    order = rng.permutation(len(rows))
    shuffled = [rows[i] for i in order]
    for part in np.array_split(np.arange(len(shuffled)), 5):  # five inserts: five parts
        warehouse.insert_arrow("myelin.feature_values", _fv_table([shuffled[i] for i in part]))
    # another version of the view, newer in every tie: a pinned query must not see it
    other = [(e, t, s + 1, -x) for e, t, s, x in rows]
    warehouse.insert_arrow("myelin.feature_values", _fv_table(other, version="cd34"))

    # Labels just after each group (they see it), exactly at it (they see the one before,
    # or nothing), and tied labels: one (entity, ts) with both label values, twice.
    labels: list[tuple[str, int, int]] = []
    expected: dict[tuple[str, int], float] = {}
    by_entity: dict[str, list[int]] = {}
    for entity, as_of in newest:
        by_entity.setdefault(entity, []).append(as_of)
    for entity, times in by_entity.items():
        previous = 0.0  # no earlier row: the SQL's imputation
        for as_of in times:
            labels += [(entity, as_of, 0), (entity, as_of + 1, 1), (entity, as_of + 1, 0)]
            labels += [(entity, as_of + 1, 1)]
            expected[(entity, as_of)] = previous
            expected[(entity, as_of + 1)] = previous = newest[(entity, as_of)]
    label_order = rng.permutation(len(labels))
    warehouse.command(f"DROP TABLE IF EXISTS {LABELS_TABLE}")
    warehouse.command(
        f"CREATE TABLE {LABELS_TABLE} (entity_id String, ts DateTime64(3, 'UTC'), label UInt8) "
        "ENGINE = MergeTree ORDER BY tuple()"
    )
    try:
        for part in np.array_split(label_order, 3):
            chunk = [labels[i] for i in part]
            warehouse.insert_arrow(
                LABELS_TABLE,
                pa.table(
                    {
                        "entity_id": [c[0] for c in chunk],
                        "ts": pa.array([c[1] for c in chunk], TS),
                        "label": pa.array([c[2] for c in chunk], pa.uint8()),
                    }
                ),
            )
        sql = training_set_sql(
            "v", ["x"], f"SELECT entity_id, ts, label FROM {LABELS_TABLE}", version="ab12"
        )
        first = warehouse.query_arrow(sql)
        assert first.num_rows == len(labels)
        got = [(r["entity_id"], int(r["ts"].timestamp() * 1000), r["x"]) for r in first.to_pylist()]
        wrong = [(e, t, x, expected[(e, t)]) for e, t, x in got if x != expected[(e, t)]]
        assert wrong == [], f"{len(wrong)} of {len(got)} labels did not get the newest row"
        blob = arrow_to_ipc(first)
        for _ in range(4):  # as the demo sends it, through the analysts' read-only gate
            assert arrow_to_ipc(warehouse.query_arrow(read_only_sql(sql))) == blob
    finally:
        warehouse.command(f"DROP TABLE IF EXISTS {LABELS_TABLE}")


def test_labels_finer_than_a_millisecond_and_several_versions(warehouse: Warehouse) -> None:
    # One event's rows in two versions (same entity, as_of and stream_seq) and a newer
    # event in the same millisecond; labels in µs and in whole seconds.
    b = RECENT_DAY_MS  # a recent day: the table's retention would drop rows of 1970
    rows = [("a", b + 10_000, 5, 1.0), ("a", b + 10_000, 9, 2.0), ("a", b + 20_000, 12, 3.0)]
    warehouse.insert_arrow("myelin.feature_values", _fv_table(rows, version="ab12"))
    other = [(e, t, s, x + 100) for e, t, s, x in rows]
    warehouse.insert_arrow("myelin.feature_values", _fv_table(other, version="cd34"))

    def at(seconds: int) -> str:
        return dt.datetime.fromtimestamp(b // 1000 + seconds, tz=dt.UTC).strftime("%F %T")

    micro = f"""SELECT * FROM VALUES('entity_id String, ts DateTime64(6, \\'UTC\\'), label UInt8',
        ('a', '{at(10)}', 0), ('a', '{at(10)}.0005', 1),
        ('a', '{at(10)}.001', 0), ('a', '{at(20)}.000001', 1))"""
    sec = b // 1000
    seconds = f"""SELECT * FROM VALUES('entity_id String, ts DateTime(\\'UTC\\'), label UInt8',
        ('a', {sec + 10}, 0), ('a', {sec + 11}, 1), ('a', {sec + 21}, 0))"""
    for labels, version, expected in [
        (micro, "ab12", [0.0, 2.0, 2.0, 3.0]),  # 10.0005 s is after the row of 10 s
        (seconds, "ab12", [0.0, 2.0, 3.0]),
        (micro, "cd34", [0.0, 102.0, 102.0, 103.0]),
        (micro, "", [0.0, 102.0, 102.0, 103.0]),  # unpinned: the greatest version wins
    ]:
        sql = training_set_sql("v", ["x"], labels, version=version)
        table = warehouse.query_arrow(sql)
        assert table.column("x").to_pylist() == expected, (labels, version)
        blob = arrow_to_ipc(table)
        for _ in range(4):
            assert arrow_to_ipc(warehouse.query_arrow(sql)) == blob
