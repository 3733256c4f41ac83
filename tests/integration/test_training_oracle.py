"""The real feature pipeline and the point-in-time SQL, checked row for row against an
independent pandas oracle (tests/pit_oracle.py) on a workload with ties, out-of-order and
late events, several partitions and a hot key spread over partitions."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import msgspec
import numpy as np
import pandas as pd  # type: ignore[import-untyped]
import pyarrow as pa
import pytest

from myelin.contracts import StreamEvent, default_registry
from myelin.records import FeatureRow, FeatureRows
from myelin.training import clicked_impressions_sql, training_set_sql
from myelin.warehouse import Warehouse, arrow_to_ipc
from services.features.logic import WindowEngine
from services.features.online_store import MemoryStateStore
from services.features.pipeline import SEQ_STRIDE, FeaturePipeline
from services.features.views import USER_ACTIVITY, Feature, FeatureView, view_doc
from services.warehouse.sink import events_table, feature_values_table
from tests import pit_oracle
from tests.helpers import RECENT_DAY_MS

pytestmark = pytest.mark.integration
TS = pa.timestamp("ms", tz="UTC")
MIN = 60_000
T0 = RECENT_DAY_MS + 12_345  # not aligned to a minute or an hour
PARTITIONS = 4
SOLO_PARTITION = 5  # used by one crafted sequence only (see ``_workload``)
LABELS = "myelin.test_oracle_labels"
_mp = msgspec.msgpack.Encoder()

# USER_ACTIVITY's feature kinds and windows, plus those it lacks: min, last, stddev,
# distinct on purchases, sessions over other sources, a ratio of a ratio declared after
# it, 30 s buckets and a lateness limit longer than the longest window.
OTHER_KINDS = FeatureView(
    name="other_kinds",
    entity="user_id",
    sources=("impression", "click", "purchase"),
    bucket_s=30,
    allowed_lateness_s=3 * 3600,  # longer than the horizon: some events are late by it only
    features=(
        Feature("per_view_per_spend", "ratio", numerator="seen_per_view", denominator="spend_2h"),
        Feature("min_spend_30m", "min", 1800, "purchase", field="amount"),
        Feature("last_spend_1h", "last", 3600, "purchase", field="amount"),
        Feature("sd_spend_1h", "stddev", 3600, "purchase", field="amount"),
        Feature("items_bought_1h", "distinct", 3600, "purchase", field="item_id"),
        Feature("spend_2h", "sum", 7200, "purchase", field="amount"),
        Feature("spend_this_half_hour", "sum", 1800, "purchase", field="amount", window="tumbling"),
        Feature("views_session", "count", 5400, "impression", window="session", gap_s=300),
        Feature(
            "spend_session", "mean", 1800, "purchase", field="amount", window="session", gap_s=90
        ),
        Feature("seen_per_view", "ratio", numerator="items_bought_1h", denominator="views_session"),
    ),
)


@dataclass
class Ev:
    event_id: str
    entity: str
    type: str
    time: int
    partition: int
    item: str
    amount: float
    seq: int = 0


def _workload(rng: np.random.Generator, n: int, view: FeatureView) -> list[Ev]:
    """About ``n`` events in stream order: users pinned to a partition, a hot user on every
    partition, rare users, bursts in one millisecond and in one minute, and arrival delays
    from none to past the view's horizon and lateness limit."""
    users = [f"u{i:02d}" for i in range(30)]
    weights = 1.0 / np.arange(1, len(users) + 1)
    pools = {
        u: [f"i{j}" for j in rng.choice(400, 12 + 8 * (i % 4), replace=False)]
        for i, u in enumerate(users)
    }
    pools["u00"] = [f"i{j}" for j in range(150)]  # past 64 distinct items: the estimate
    pools["hot"] = [f"i{j}" for j in range(40)]
    span = 5 * 60 * MIN
    evs: list[tuple[int, int, Ev]] = []  # (arrival, order, event)

    def add(entity: str, t: int, partition: int, delay: int) -> None:
        kind = rng.choice(["impression", "click", "purchase"], p=[0.65, 0.22, 0.13])
        pool = pools.get(entity, ["i1", "i2", "i3"])
        item = pool[int(rng.integers(len(pool)))]
        amount = round(float(rng.uniform(0.5, 250.0)), 2)
        ev = Ev(f"e{len(evs)}", entity, str(kind), t, partition, item, amount)
        evs.append((t + delay, len(evs), ev))
        if rng.random() < 0.03:  # sent again (a producer's retry past ingest's dedupe)
            again = int(
                rng.integers(0, 3 * MIN) if rng.random() < 0.7 else rng.integers(65, 180) * MIN
            )
            evs.append((t + delay + again, len(evs), replace(ev)))

    def delay() -> int:
        r = rng.random()
        if r < 0.82:
            return 0
        if r < 0.90:
            return int(rng.integers(1, 5 * MIN))
        if r < 0.96:
            return int(rng.integers(10 * MIN, 50 * MIN))
        if r < 0.98:
            return int(rng.integers(65 * MIN, 110 * MIN))
        return int(rng.integers(125 * MIN, 175 * MIN))

    t = T0
    step = span / n * 2.6  # events per step: 2.2 in a burst, 0.4 more in its minute
    while t < T0 + span:
        t += int(rng.exponential(step))
        if rng.random() < 0.1:
            entity, partition = "hot", int(rng.integers(PARTITIONS))  # a salted hot key
        else:
            u = int(rng.choice(len(users), p=weights / weights.sum()))
            entity, partition = users[u], u % PARTITIONS
        d = delay()
        for _ in range(int(rng.choice([1, 1, 1, 2, 3, 5]))):  # a burst in one millisecond
            add(entity, t, partition, d)
        if rng.random() < 0.2:  # and more in the same minute, in any order
            for _ in range(int(rng.integers(1, 4))):
                add(entity, t - t % MIN + int(rng.integers(MIN)), partition, d)
    for r in range(6):  # rare users: their late events are late by partition only
        times = sorted(T0 + int(x) for x in rng.integers(0, span, 3))
        for k, tr in enumerate(times):
            add(f"r{r}", tr, r % PARTITIONS, 100 * MIN if k == 1 else 0)
    stream = [e for _, _, e in sorted(evs, key=lambda x: (x[0], x[1]))]

    # On a partition of its own: the hot user's event, late by its horizon, still moves
    # the partition's watermark, so that 'solo's first event is late by partition (it
    # would not be if the watermark only counted applied events); its second is applied.
    hot = max(e.time for e in stream if e.entity == "hot") - view.max_window_s * 1000 - 5 * MIN
    limit = hot - view.allowed_lateness_s * 1000
    stream.append(Ev("x1", "hot", "impression", hot, SOLO_PARTITION, "i1", 1.0))
    stream.append(Ev("x2", "solo", "impression", limit - 10 * MIN, SOLO_PARTITION, "i1", 1.0))
    stream.append(Ev("x3", "solo", "purchase", limit + 10 * MIN, SOLO_PARTITION, "i2", 7.25))
    return stream


def _messages(rng: np.random.Generator, stream: list[Ev]) -> list[tuple[int, bytes]]:
    """Stream messages of 1-6 consecutive events of one partition; sets each ``seq``."""
    out: list[tuple[int, bytes]] = []
    k = 0
    while k < len(stream):
        size = int(rng.integers(1, 7))
        batch = [stream[k]]
        while len(batch) < size and k + len(batch) < len(stream):
            nxt = stream[k + len(batch)]
            if nxt.partition != batch[0].partition:
                break
            batch.append(nxt)
        stream_seq = len(out) + 1
        events = []
        for idx, e in enumerate(batch):
            e.seq = stream_seq * SEQ_STRIDE + idx
            data: dict[str, Any] = {"user_id": e.entity, "item_id": e.item}
            if e.type == "purchase":
                data["amount"] = e.amount
            events.append(
                StreamEvent(
                    event_id=e.event_id,
                    type=e.type,
                    schema_version=1,
                    event_time=e.time,
                    ingest_time=e.time,
                    producer_id="test",
                    client_version="",
                    trace_id=f"{e.seq:032x}",
                    entity_id=e.entity,
                    partition=e.partition,
                    data=msgspec.Raw(_mp.encode(data)),
                )
            )
        out.append((stream_seq, _mp.encode(events)))
        k += len(batch)
    return out


async def _run_pipeline(
    view: FeatureView, messages: list[tuple[int, bytes]]
) -> tuple[list[FeatureRow], list[tuple[int, StreamEvent]], int]:
    """The feature rows, the late events and how many events were duplicates."""
    rows: list[FeatureRow] = []
    late: list[tuple[int, StreamEvent]] = []

    async def rows_sink(_v: FeatureView, batch: list[FeatureRow], _first: int, _last: int) -> None:
        rows.extend(batch)

    async def late_sink(_view: str, events: list[tuple[int, StreamEvent]]) -> None:
        late.extend(events)

    # a small cache: states are evicted and reloaded (copies without the window caches)
    pipeline = FeaturePipeline(
        WindowEngine(view),
        default_registry(),
        MemoryStateStore(),
        rows_sink,
        cache_items=8,
        late_sink=late_sink,
    )
    await pipeline.start()
    for k in range(0, len(messages), 40):
        assert await pipeline.process(messages[k : k + 40]) == []  # every message readable
    return rows, late, pipeline.stats.duplicates


def _frame(stream: list[Ev]) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "event_id": [e.event_id for e in stream],
            "entity_id": [e.entity for e in stream],
            "type": [e.type for e in stream],
            "event_time": [e.time for e in stream],
            "seq": [e.seq for e in stream],
            "partition": [e.partition for e in stream],
            "item_id": [e.item for e in stream],
            "amount": [e.amount if e.type == "purchase" else math.nan for e in stream],
        }
    )


def _synthetic_labels(rng: np.random.Generator, stream: list[Ev]) -> pd.DataFrame:
    """Labels at event times, 1 ms after them, at random times, for unknown entities,
    and ties: the same (entity, ts) with both label values."""
    entities: list[str] = []
    times: list[int] = []
    for e in [stream[i] for i in rng.choice(len(stream), 1500, replace=False)]:
        entities += [e.entity, e.entity]
        times += [e.time, e.time + 1]
    everyone = [*sorted({e.entity for e in stream}), "ghost"]
    lo, hi = min(e.time for e in stream) - 30 * MIN, max(e.time for e in stream) + 120 * MIN
    for _ in range(800):
        entities.append(everyone[int(rng.integers(len(everyone)))])
        times.append(int(rng.integers(lo, hi)))
    labels = [int(x) for x in rng.integers(0, 2, len(times))]
    for i in rng.choice(len(times), 300, replace=False).tolist():
        entities.append(entities[i])
        times.append(times[i])
        labels.append(1 - labels[i])
    return pd.DataFrame({"entity_id": entities, "ts": times, "label": labels})


def _compare(got: pa.Table, want: pd.DataFrame, view: pit_oracle.View) -> list[str]:
    """Row-for-row differences: exact for keys, as_of and counts, 1e-9 relative for the
    other values, NaN equal to NaN."""
    if got.num_rows != len(want):
        return [f"{got.num_rows} rows, the oracle has {len(want)}"]
    cols = got.to_pydict()
    cols["ts"] = got.column("ts").cast(pa.int64()).to_pylist()
    cols["features_as_of"] = got.column("features_as_of").cast(pa.int64()).to_pylist()
    exact = {"entity_id", "ts", "label", "features_as_of"} | {
        f.name for f in view.features if f.kind in pit_oracle.COUNT_KINDS
    }
    diffs: list[str] = []
    for name in ["entity_id", "ts", "label", "features_as_of", *view.names]:
        for i, (g, w) in enumerate(zip(cols[name], want[name].tolist(), strict=True)):
            if not (g == w if name in exact else _close(g, w)):
                diffs.append(
                    f"row {i} {cols['entity_id'][i]}@{cols['ts'][i]} {name}: {g!r} != {w!r}"
                )
    return diffs


def _close(got: float, want: float) -> bool:
    return (math.isnan(got) and math.isnan(want)) or math.isclose(got, want, rel_tol=1e-9)


def _labels_table(labels: pd.DataFrame) -> pa.Table:
    return pa.table(
        {
            "entity_id": pa.array(labels["entity_id"].tolist(), pa.string()),
            "ts": pa.array(labels["ts"].tolist(), TS),
            "label": pa.array(labels["label"].tolist(), pa.uint8()),
        }
    )


@pytest.mark.parametrize("view", [USER_ACTIVITY, OTHER_KINDS], ids=lambda v: v.name)
async def test_training_set_matches_the_oracle(warehouse: Warehouse, view: FeatureView) -> None:
    rng = np.random.default_rng(20_260_511)
    stream = _workload(rng, 3000, view)
    messages = _messages(rng, stream)
    rows, late, duplicates = await _run_pipeline(view, messages)
    oracle_view = pit_oracle.View.from_doc(view_doc(view))
    events = _frame(stream)
    outcome = pit_oracle.outcomes(events, oracle_view)

    # the workload has what it is meant to have
    # (user_activity's lateness limit equals its horizon: its late events are nearly all
    # late by partition; other_kinds' is longer: nearly all by the horizon)
    by_partition, by_horizon = outcome["partition_late"].sum(), outcome["entity_late"].sum()
    assert by_partition >= 1 and by_horizon >= 1 and by_partition + by_horizon >= 25
    assert (outcome.groupby(["entity_id", "as_of"]).size() > 1).sum() >= 100  # tied as_of
    late_seqs = set(outcome.loc[outcome["partition_late"] | outcome["entity_late"], "seq"])
    assert late_seqs == {seq for seq, _ in late}
    assert duplicates == outcome["duplicate"].sum() >= 10
    solo = outcome[outcome["entity_id"] == "solo"]
    assert solo["partition_late"].tolist() == [True, False]

    # the pipeline's rows are the oracle's, one per applied event
    want_rows = pit_oracle.feature_rows(events, oracle_view)
    if view is USER_ACTIVITY:  # u00's impressions pass 64 distinct items in an hour
        assert (want_rows["distinct_items_1h"] > 64).sum() >= 50
    got_rows = pa.table(
        {
            "entity_id": [r.entity_id for r in rows],
            "ts": pa.array([r.stream_seq for r in rows], pa.int64()),  # compared as keys
            "label": [0] * len(rows),
            "features_as_of": pa.array([r.as_of for r in rows], pa.int64()),
            **{n: [r.values[i] for r in rows] for i, n in enumerate(view.feature_names)},
        }
    )
    want_view = want_rows.rename(columns={"seq": "ts", "as_of": "features_as_of"}).assign(label=0)
    diffs = _compare(got_rows, want_view, oracle_view)
    assert not diffs, f"feature rows: {len(diffs)} differences, first {diffs[:10]}"

    # into ClickHouse: feature rows in shuffled parts, raw events, late copies
    order = rng.permutation(len(rows))
    names = list(view.feature_names)
    for part in np.array_split(order, 4):
        chunk = [rows[i] for i in part.tolist()]
        batch = FeatureRows(view=view.name, version=view.content_hash, features=names, rows=chunk)
        warehouse.insert_arrow("myelin.feature_values", feature_values_table([batch]))
    decoded = msgspec.msgpack.Decoder(list[StreamEvent])
    all_events = [
        (stream_seq * SEQ_STRIDE + idx, ev)
        for stream_seq, payload in messages
        for idx, ev in enumerate(decoded.decode(payload))
    ]
    warehouse.insert_arrow("myelin.events", events_table(all_events))
    warehouse.insert_arrow("myelin.events", events_table(late, late=True))

    # labels from impressions (the demo's), and synthetic ones
    clicked = pit_oracle.clicked_impressions(events, oracle_view, 60)
    assert clicked["label"].sum() >= 25
    alone = warehouse.query_arrow(clicked_impressions_sql(60))  # one row per impression
    assert arrow_to_ipc(warehouse.query_arrow(clicked_impressions_sql(60))) == arrow_to_ipc(alone)
    assert sorted(
        zip(
            alone.column("ts").cast(pa.int64()).to_pylist(),
            alone.column("entity_id").to_pylist(),
            alone.column("label").to_pylist(),
            strict=True,
        )
    ) == sorted(zip(clicked["ts"], clicked["entity_id"], clicked["label"], strict=True))
    synthetic = _synthetic_labels(rng, stream)
    warehouse.command(f"DROP TABLE IF EXISTS {LABELS}")
    warehouse.command(
        f"CREATE TABLE {LABELS} (entity_id String, ts DateTime64(3, 'UTC'), label UInt8) "
        "ENGINE = MergeTree ORDER BY tuple()"
    )
    try:
        for part in np.array_split(rng.permutation(len(synthetic)), 3):
            warehouse.insert_arrow(LABELS, _labels_table(synthetic.iloc[part]))
        for labels_sql, labels in [
            (clicked_impressions_sql(60), clicked),
            (f"SELECT entity_id, ts, label FROM {LABELS}", synthetic),
        ]:
            sql = training_set_sql(view.name, names, labels_sql, version=view.content_hash)
            got = warehouse.query_arrow(sql)
            want = pit_oracle.point_in_time(want_rows, labels, oracle_view)
            diffs = _compare(got, want, oracle_view)
            assert not diffs, f"{labels_sql}: {len(diffs)} differences, first {diffs[:10]}"

        # Bounded by a stream sequence (a retrain's training set): what the platform knew
        # once that message was applied, though the whole stream is stored. Labels count
        # only clicks up to the bound, and only impressions whose click window had closed
        # by the bound's newest event time.
        bound = messages[len(messages) // 2][0]
        prefix = events[events["seq"] < (bound + 1) * SEQ_STRIDE]
        known = pit_oracle.clicked_impressions(prefix, oracle_view, 60)
        known = known[known["ts"] + 60_000 <= prefix["event_time"].max()]
        assert 0 < len(known) < len(clicked) and known["label"].sum() >= 10
        sql = training_set_sql(
            view.name,
            names,
            clicked_impressions_sql(60, max_seq=bound),
            version=view.content_hash,
            max_seq=bound,
        )
        got = warehouse.query_arrow(sql)
        want = pit_oracle.point_in_time(
            want_rows[want_rows["seq"] < (bound + 1) * SEQ_STRIDE], known, oracle_view
        )
        diffs = _compare(got, want, oracle_view)
        assert not diffs, f"bounded at {bound}: {len(diffs)} differences, first {diffs[:10]}"
    finally:
        warehouse.command(f"DROP TABLE IF EXISTS {LABELS}")


def test_the_oracle_on_a_hand_computed_case() -> None:
    """The oracle itself, on a case small enough to check by hand."""
    view = pit_oracle.View.from_doc(view_doc(USER_ACTIVITY))
    m = T0 - T0 % (60 * MIN)  # an hour boundary
    nan = math.nan
    ev = pd.DataFrame.from_records(
        [
            ("a", "impression", m, 1000, 0, "x", nan),
            ("a", "click", m, 1001, 0, "x", nan),
            ("a", "impression", m + 30 * MIN, 2000, 0, "y", nan),
            ("a", "purchase", m + 30 * MIN, 3000, 0, "y", 4.5),
            ("a", "impression", m + 5 * MIN, 4000, 0, "x", nan),
            ("a", "click", m - 30 * MIN, 5000, 0, "z", nan),
            ("d", "click", m - 31 * MIN, 5500, 0, "x", nan),
            ("b", "click", m, 6000, 1, "x", nan),
        ],
        columns=["entity_id", "type", "event_time", "seq", "partition", "item_id", "amount"],
    )
    out = pit_oracle.outcomes(ev, view)
    # 5000: in the bucket an hour before a's newest (late by the horizon), yet not more
    # than an hour behind its partition; 5500: 61 min behind the partition, and its
    # entity (d) has seen nothing
    assert out["entity_late"].tolist() == [False] * 5 + [True, False, False]
    assert out["partition_late"].tolist() == [False] * 6 + [True, False]
    assert out["as_of"].tolist() == [m, m] + [m + 30 * MIN] * 3 + [-1, -1, m]
    rows = pit_oracle.feature_rows(ev, view).set_index("seq")
    assert rows.loc[1001, "ctr_10m"] == 1.0 and rows.loc[1000, "clicks_10m"] == 0.0
    assert (
        rows.loc[1000, "impressions_this_hour"] == 1.0 and rows.loc[1001, "clicks_session"] == 1.0
    )
    r = rows.loc[4000]  # the out-of-order impression counts; the windows end at m + 30 min
    assert (r["impressions_1h"], r["impressions_10m"], r["distinct_items_1h"]) == (3.0, 1.0, 2.0)
    assert r["clicks_session"] == 0.0  # 25 min between m + 5 and m + 30: a new session
    assert r["spend_1h"] == 4.5 and math.isnan(rows.loc[2000, "max_spend_1h"])
    labels = pd.DataFrame(
        {
            "entity_id": ["a", "a", "a", "c"],
            "ts": [m, m + 1, m + 30 * MIN + 1, m],
            "label": [1, 0, 1, 0],
        }
    )
    pit = pit_oracle.point_in_time(pit_oracle.feature_rows(ev, view), labels, view)
    assert pit["entity_id"].tolist() == ["a", "c", "a", "a"]
    assert pit["features_as_of"].tolist() == [0, 0, m, m + 30 * MIN]
    # at m + 30 min + 1: the newest of the three rows with that as_of (seq 4000)
    assert pit["impressions_1h"].tolist() == [0.0, 0.0, 1.0, 3.0]
