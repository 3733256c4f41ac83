from __future__ import annotations

import datetime as dt

import pyarrow as pa
import pytest

from myelin.training import training_set_sql
from myelin.warehouse import Warehouse

pytestmark = pytest.mark.integration
TS = pa.timestamp("ms", tz="UTC")


def test_point_in_time_join_matches_a_hand_computed_case(warehouse: Warehouse) -> None:
    # Feature values for entity a change at t=10, 20, 30; for b at t=15.
    fv = pa.table(
        {
            "view": ["v"] * 4,
            "view_hash": ["h"] * 4,
            "entity_id": ["a", "a", "a", "b"],
            "as_of": pa.array([10_000, 20_000, 30_000, 15_000], TS),
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
    labels = """SELECT * FROM VALUES('entity_id String, ts DateTime64(3, \\'UTC\\'), label UInt8',
        ('a', 5, 0), ('a', 20, 1), ('a', 25, 0), ('a', 99, 1), ('b', 15, 1), ('b', 16, 0), ('c', 50, 1))"""
    # VALUES reads DateTime64 from seconds
    table = warehouse.query_arrow(training_set_sql("v", ["x"], labels))
    got = [(r["entity_id"], int(r["ts"].timestamp()), r["x"]) for r in table.to_pylist()]
    assert got == [
        ("a", 5, 0.0),  # nothing before t=5: reads 0
        ("b", 15, 0.0),  # b's first value is at 15 exactly: not visible at 15
        ("b", 16, 7.0),
        ("a", 20, 1.0),  # strictly before 20: the t=10 value, not the t=20 one
        ("a", 25, 2.0),
        ("c", 50, 0.0),  # unknown entity
        ("a", 99, 3.0),
    ]
    assert table.column("features_as_of").to_pylist()[4] == dt.datetime(
        1970, 1, 1, 0, 0, 20, tzinfo=dt.UTC
    )
