"""Point-in-time training set on a million labels: Myelin's ASOF JOIN SQL
(``myelin.training.training_set_sql``) next to a bare scan of the same two tables in the
same chdb engine (reading every row once, the least any join must do).

Run: .venv/bin/python -m bench.training_bench [--rows N]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from bench._common import table
from myelin.training import training_set_sql
from myelin.warehouse import DDL, ChdbWarehouse

TS = pa.timestamp("ms", tz="UTC")

# 30 days back, on a day boundary: inside the tables' retention (TTL) whatever the date
BASE_MS = (int(time.time() * 1000) // 86_400_000 - 30) * 86_400_000


def main(rows: int) -> None:
    d = Path(tempfile.mkdtemp(prefix="myelin-tbench-"))
    wh = ChdbWarehouse(d)
    try:
        for q in DDL:
            wh.command(q)
        rng = np.random.default_rng(1)
        entities = rows // 10
        ent = np.char.add("u", rng.integers(0, entities, rows).astype(str))
        t = BASE_MS + rng.integers(0, 7 * 86_400_000, rows)
        keys = ["a", "b", "c", "d"]
        vals = rng.random((rows, len(keys)))
        fv = pa.table(
            {
                "view": pa.array(["v"] * rows),
                "view_hash": pa.array(["h"] * rows),
                "entity_id": pa.array(ent),
                "as_of": pa.array(t, TS),
                "stream_seq": pa.array(np.arange(rows, dtype=np.uint64)),
                "trace_id": pa.array([""] * rows),
                "values": pa.array(
                    [list(zip(keys, r, strict=True)) for r in vals.tolist()],
                    pa.map_(pa.string(), pa.float64()),
                ),
            }
        )
        wh.insert_arrow("myelin.feature_values", fv)
        wh.command(
            "CREATE TABLE myelin.labels (entity_id String, ts DateTime64(3, 'UTC'), label UInt8) "
            "ENGINE = MergeTree ORDER BY (entity_id, ts)"
        )
        lt = pa.table(
            {
                "entity_id": pa.array(
                    np.char.add("u", rng.integers(0, entities, rows).astype(str))
                ),
                "ts": pa.array(BASE_MS + rng.integers(0, 7 * 86_400_000, rows), TS),
                "label": pa.array(rng.integers(0, 2, rows).astype(np.uint8)),
            }
        )
        wh.insert_arrow("myelin.labels", lt)
        wh.command("OPTIMIZE TABLE myelin.feature_values FINAL")
        sql = training_set_sql("v", keys, "SELECT entity_id, ts, label FROM myelin.labels")
        timings = []
        for _ in range(3):
            t0 = time.perf_counter()
            out = wh.query_arrow(sql)
            timings.append(time.perf_counter() - t0)
        assert out.num_rows == rows
        bare = []
        for _ in range(3):
            t0 = time.perf_counter()
            wh.query_arrow(
                "SELECT (SELECT sum(cityHash64(entity_id, ts, label)) FROM myelin.labels) + "
                "(SELECT sum(cityHash64(entity_id, as_of, values['a'], values['b'], values['c'], values['d'])) "
                "FROM myelin.feature_values FINAL WHERE view = 'v') AS n"
            )
            bare.append(time.perf_counter() - t0)
        ours, ceiling = min(timings), min(bare)
        rows_out = [
            (
                f"PIT training set, {rows:,} labels x {rows:,} feature rows",
                "rows/s",
                rows / ours,
                rows / ceiling,
                "ceiling: bare scan of both tables in the same engine",
            ),
            (
                f"PIT training set, {rows:,} labels x {rows:,} feature rows",
                "wall ms",
                ours * 1000,
                ceiling * 1000,
                "",
            ),
        ]
        print(table("Point-in-time training set (chdb, 2 cores)", rows_out))
    finally:
        wh.close()
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_000_000)
    main(ap.parse_args().rows)
