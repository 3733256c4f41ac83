"""Time-travel backtest (myelin/backtest.py) on a real chdb warehouse: a ledger written as
serving writes it (v1 on route champion, v2 on route canary, shadow rows, rows outside the
period) with click events as outcomes; the oracle is scikit-learn on the rows written, and
onnxruntime run directly on matrices built row by row in Python."""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import msgspec
import numpy as np
import onnxruntime as ort
import pyarrow as pa
import pytest
from nats.aio.client import Client as NATS
from sklearn.metrics import log_loss, roc_auc_score

from myelin import bus
from myelin.backtest import (
    BacktestReport,
    BadTime,
    NoLabelSource,
    NothingToBacktest,
    backtest_command,
    format_report,
    run_backtest,
)
from myelin.contracts import StreamEvent
from myelin.demo.trainer import train
from myelin.models import LabelSource, ModelRegistry, ModelVersion, Provenance, TensorSpec
from myelin.records import InferenceRecord, Prediction
from myelin.settings import Settings
from myelin.warehouse import Warehouse
from services.warehouse.sink import WarehouseSink, events_table, inferences_table
from services.warehouse.sql_api import serve_sql
from tests.helpers import stream_event

pytestmark = pytest.mark.integration
HOUR = 3_600_000
WINDOW_S = 600
SOURCE = LabelSource(kind="event", event_type="click", window_s=WINDOW_S)
V1 = ["clicks_1h", "views_1h"]
V2 = ["views_1h", "clicks_1h", "ctr_7d"]
CANDIDATE = ["ctr_7d", "clicks_1h", "views_1h"]  # an order neither served map has


def _truth(clicks: float, views: float, ctr: float) -> float:
    return 1 / (1 + math.exp(-(-1.5 + 0.5 * clicks - 0.08 * views + 6 * ctr)))


def _draw(rng: random.Random) -> dict[str, float]:
    return {
        "clicks_1h": float(rng.randrange(6)),
        "views_1h": float(rng.randrange(20)),
        "ctr_7d": rng.uniform(0, 0.3),
    }


def _train(features: list[str], seed: int) -> bytes:
    rng = random.Random(seed)
    cols: dict[str, list[Any]] = {f: [] for f in features}
    cols["label"], cols["ts"] = [], []
    for k in range(300):
        row = _draw(rng)
        for f in features:
            cols[f].append(row[f])
        cols["label"].append(int(rng.random() < _truth(**_args(row))))
        cols["ts"].append(k)
    table = pa.table({**cols, "ts": pa.array(cols["ts"], pa.timestamp("ms"))})
    return train(table, features).onnx


def _args(row: dict[str, float]) -> dict[str, float]:
    return {"clicks": row["clicks_1h"], "views": row["views_1h"], "ctr": row["ctr_7d"]}


def _scores(onnx: bytes, maps: list[dict[str, float]], features: list[str]) -> np.ndarray:
    """The oracle: a matrix built row by row (absent or NaN -> 0), onnxruntime run directly."""
    x = np.array([[m.get(f, math.nan) for f in features] for m in maps], dtype=np.float32)
    x = np.nan_to_num(x, nan=0.0)
    sess = ort.InferenceSession(onnx, providers=["CPUExecutionProvider"])
    return np.asarray(sess.run(None, {"input": x})[1][:, 1], dtype=np.float64)


def _oracle(scores: np.ndarray, labels: list[int]) -> dict[str, float]:
    y = np.array(labels)
    bins = np.minimum(np.floor(scores * 10), 9)
    ece = sum(abs((scores[bins == b] - y[bins == b]).sum()) for b in range(10)) / len(y)
    return {
        "n": len(y),
        "positives": int(y.sum()),
        "auc": float(roc_auc_score(y, scores)),
        "logloss": float(log_loss(y, scores, labels=[0, 1])),
        "mean_score": float(scores.mean()),
        "positive_rate": float(y.mean()),
        "ece": float(ece),
    }


def _same(got: Any, want: dict[str, float]) -> None:
    assert (got["n"], got["positives"]) == (want["n"], want["positives"])
    for k in ("auc", "logloss", "mean_score", "positive_rate", "ece"):
        assert got[k] == pytest.approx(want[k], rel=1e-9, abs=1e-12), k


@dataclass
class Ledger:
    t_from: int
    t_to: int
    rows: list[dict[str, Any]]  # every Predict row written: version, route, ts, maps, score, label
    onnx: dict[str, bytes]


def _candidate(version: int, features: list[str]) -> ModelVersion:
    return ModelVersion(
        name="ctr",
        version=version,
        artifact=f"ctr/v{version}.onnx",
        sha256="",
        size=0,
        created_ms=0,
        provenance=Provenance(features=features, label_source=SOURCE),
    )


@pytest.fixture(scope="module")
def models() -> dict[str, bytes]:
    return {"1": _train(V1, 1), "2": _train(V2, 2), "3": _train(CANDIDATE, 3)}


@pytest.fixture
def ledger(warehouse: Warehouse, models: dict[str, bytes]) -> Ledger:
    rng = random.Random(7)
    base = (int(time.time() * 1000) // HOUR - 8) * HOUR
    t_from, t_to = base + HOUR, base + 3 * HOUR
    plan: list[tuple[str, str, int]] = []
    for k in range(420):
        version, route = ("2", "canary") if k % 3 == 0 else ("1", "champion")
        plan.append((version, route, base + rng.randrange(4 * HOUR)))  # a third outside
    plan += [("1", "champion", t_from), ("1", "champion", t_to)]  # the bounds: [from, to)
    rows: list[dict[str, Any]] = []
    records: list[InferenceRecord] = []
    clicks: list[StreamEvent] = []
    for k, (version, route, ts) in enumerate(plan):
        truth = _draw(rng)
        read = V1 if version == "1" else V2  # the ledger holds what the served model read
        served = {f: truth[f] for f in read}
        if rng.random() < 0.08:
            served["clicks_1h"] = math.nan  # missing online: served as 0, recorded as NaN
        score = float(_scores(models[version], [served], read)[0])
        label = int(rng.random() < _truth(**_args(truth)))
        user = f"u{k}"
        if label:
            clicks.append(stream_event(f"c{k}", user, ts + rng.randrange(1, WINDOW_S * 1000)))
        elif rng.random() < 0.3:
            clicks.append(stream_event(f"c{k}", user, ts + WINDOW_S * 1000 + 5000))  # too late
        record = InferenceRecord(
            request_id=f"r{k}",
            ts_ms=ts,
            api="predict",
            model="ctr",
            model_version=version,
            alias=route,
            latency_us=1,
            trace_id="",
            route=route,
            predictions=[Prediction(user, score, served, 5, "FRESH", "")],
            rows=1,
        )
        records.append(record)
        row = {"version": version, "route": route, "ts": ts, "map": served, "label": label}
        rows.append(row | {"score": score})
        if k % 4 == 0:  # a shadow scored this request too: same id, features and outcome
            shadow = Prediction(user, 1 - score, served, 5, "FRESH", "")
            records.append(
                msgspec.structs.replace(
                    record, model_version="9", alias="shadow", route="shadow", predictions=[shadow]
                )
            )
            rows.append(row | {"version": "9", "route": "shadow", "score": 1 - score})
    warehouse.insert_arrow("myelin.inferences", inferences_table(records))
    warehouse.insert_arrow(
        "myelin.events", events_table([(1000 * (i + 1), e) for i, e in enumerate(clicks)])
    )
    return Ledger(t_from, t_to, rows, models)


def _query(warehouse: Warehouse) -> Any:
    async def query(sql: str) -> pa.Table:
        return warehouse.query_arrow(sql)

    return query


def _in_period(ledger: Ledger) -> list[dict[str, Any]]:
    return [
        r for r in ledger.rows if ledger.t_from <= r["ts"] < ledger.t_to and r["route"] != "shadow"
    ]


async def test_candidate_and_served_versions_match_the_oracle(
    warehouse: Warehouse, ledger: Ledger
) -> None:
    report = await run_backtest(
        _query(warehouse),
        ledger.onnx["3"],
        _candidate(3, CANDIDATE),
        SOURCE,
        ledger.t_from,
        ledger.t_to,
    )
    rows = _in_period(ledger)
    shadows = [r for r in ledger.rows if r["route"] == "shadow"]
    assert sum(ledger.t_from <= r["ts"] < ledger.t_to for r in shadows) > 20  # left out
    assert any(r["ts"] == ledger.t_from for r in rows)  # the lower bound is in
    assert not any(r["ts"] == ledger.t_to for r in rows)  # the upper bound is out
    assert 200 < len(rows) < 330 and report.rows == report.served_rows == len(rows)
    assert [(g.model_version, g.route) for g in report.groups] == [
        ("1", "champion"),
        ("2", "canary"),
    ]
    cand_all = _scores(ledger.onnx["3"], [r["map"] for r in rows], CANDIDATE)
    for g in report.groups:
        mask = [r["version"] == g.model_version for r in rows]
        mine = [r for r, m in zip(rows, mask, strict=True) if m]
        labels = [r["label"] for r in mine]
        _same(g.served, _oracle(np.array([r["score"] for r in mine]), labels))
        _same(g.candidate, _oracle(cand_all[np.array(mask)], labels))
    labels = [r["label"] for r in rows]
    _same(report.served, _oracle(np.array([r["score"] for r in rows]), labels))
    _same(report.candidate, _oracle(cand_all, labels))
    # v1 never read ctr_7d: the candidate scored it as 0 there, and says so
    n_v1 = sum(r["version"] == "1" for r in rows)
    assert report.missing == {"ctr_7d": n_v1}
    assert len(report.warnings) == 1 and f"ctr_7d (missing in {n_v1:,} of" in report.warnings[0]
    text = format_report(report)
    assert "candidate v3" in text and "same rows: candidate v3 vs served" in text
    assert f"{len(rows):,} judged rows of {len(rows):,} served" in text


async def test_replaying_a_served_version_reproduces_its_served_scores(
    warehouse: Warehouse, ledger: Ledger
) -> None:
    report = await run_backtest(
        _query(warehouse), ledger.onnx["2"], _candidate(2, V2), SOURCE, ledger.t_from, ledger.t_to
    )
    v2 = next(g for g in report.groups if g.model_version == "2")
    # The same artifact on the same features as served: the same scores, up to one float32
    # ulp: onnxruntime takes another kernel for a one-row batch (how each row was served
    # here) than for a larger one (measured: ~1.2e-7 apart on some rows).
    assert (v2.candidate["n"], v2.candidate["positives"]) == (
        v2.served["n"],
        v2.served["positives"],
    )
    for k in ("auc", "logloss", "mean_score", "ece"):
        assert v2.candidate[k] == pytest.approx(v2.served[k], rel=1e-6, abs=1e-7), k
    assert v2.candidate["auc"] == v2.served["auc"]  # no order flips at that resolution
    v1 = next(g for g in report.groups if g.model_version == "1")
    assert v1.candidate != v1.served and report.missing == {"ctr_7d": v1.served["n"]}


async def test_chunked_reads_give_the_same_report_and_say_how_far_they_got(
    warehouse: Warehouse, ledger: Ledger
) -> None:
    args = (ledger.onnx["3"], _candidate(3, CANDIDATE), SOURCE, ledger.t_from, ledger.t_to)
    whole = await run_backtest(_query(warehouse), *args)
    lines: list[str] = []
    sqls: list[str] = []

    async def counting(sql: str) -> pa.Table:
        sqls.append(sql)
        return warehouse.query_arrow(sql)

    chunked: BacktestReport = await run_backtest(counting, *args, lines.append, chunk_rows=40)
    assert chunked == whole
    reads = [s for s in sqls if "ASOF LEFT JOIN" in s]
    assert len(reads) >= whole.rows // 40
    assert len(lines) == len(reads) + 1 and "100%" in lines[-1]
    assert f"{whole.rows:,}/{whole.rows:,}" in lines[-1]


async def test_a_period_without_judged_rows_is_a_clear_error(
    warehouse: Warehouse, ledger: Ledger
) -> None:
    now = int(time.time() * 1000)
    recent = [
        InferenceRecord(
            request_id=f"new{k}",
            ts_ms=now - 60_000 + k,
            api="predict",
            model="ctr",
            model_version="1",
            alias="champion",
            latency_us=1,
            trace_id="",
            route="champion",
            predictions=[Prediction(f"n{k}", 0.5, {"clicks_1h": 1.0}, 5, "FRESH", "")],
            rows=1,
        )
        for k in range(5)
    ]
    warehouse.insert_arrow("myelin.inferences", inferences_table(recent))
    cand = _candidate(3, CANDIDATE)
    query = _query(warehouse)
    with pytest.raises(NothingToBacktest, match="none has a known outcome yet") as exc:
        await run_backtest(query, ledger.onnx["3"], cand, SOURCE, now - 120_000, now + 1000)
    assert exc.value.details["served_rows"] == 5 and "label window" in exc.value.message
    with pytest.raises(NothingToBacktest, match="was served between") as exc:
        await run_backtest(query, ledger.onnx["3"], cand, SOURCE, 0, ledger.t_from - 4 * HOUR)
    assert exc.value.details["served_rows"] == 0


async def test_labels_keyed_by_request_id(warehouse: Warehouse, models: dict[str, bytes]) -> None:
    base = int(time.time() * 1000) - HOUR
    served = {"clicks_1h": 2.0, "views_1h": 3.0}
    records = [
        InferenceRecord(
            request_id=f"r{k}",
            ts_ms=base + k,
            api="predict",
            model="ctr",
            model_version="1",
            alias="champion",
            latency_us=1,
            trace_id="",
            route="champion",
            predictions=[Prediction(f"u{k}", 0.1 * k, served, 5, "FRESH", "")],
            rows=1,
        )
        for k in range(1, 7)
    ]
    warehouse.insert_arrow("myelin.inferences", inferences_table(records))
    labels = [
        stream_event(f"l{k}", f"u{k}", base + 10_000, typ="outcome", request_id=f"r{k}", label=v)
        for k, v in ((1, 0), (2, 1), (3, 0), (4, 1), (6, 1))  # r5 never labelled
    ]
    warehouse.insert_arrow(
        "myelin.events", events_table([(1000 * (i + 1), e) for i, e in enumerate(labels)])
    )
    source = LabelSource(kind="request", event_type="outcome")
    report = await run_backtest(
        _query(warehouse),
        models["1"],
        _candidate(1, V1),
        source,
        base,
        base + 6,  # r6 out
    )
    (group,) = report.groups
    assert (report.rows, report.served_rows) == (4, 5)
    _same(group.served, _oracle(np.array([0.1, 0.2, 0.3, 0.4]), [0, 1, 0, 1]))
    want = _scores(models["1"], [served] * 4, V1)
    _same(group.candidate, _oracle(want, [0, 1, 0, 1]))


async def test_the_command_resolves_the_version_falls_back_for_the_label_source_and_prints(
    warehouse: Warehouse,
    ledger: Ledger,
    nc: NATS,
    settings: Settings,
    capsys: pytest.CaptureFixture[str],
) -> None:
    reg = ModelRegistry(nc, bus.jetstream(nc, settings))

    async def register(name: str, onnx: bytes, prov: Provenance) -> None:
        await reg.register(
            name,
            onnx,
            inputs=[TensorSpec("input", "FP32", [-1, len(prov.features)])],
            outputs=[TensorSpec("probabilities", "FP32", [-1, 2])],
            provenance=prov,
            metrics={},
        )

    # ctr v1 (the candidate) names no label source; the newest version (v3) does
    await register("ctr", ledger.onnx["2"], Provenance(features=V2))
    await register("ctr", ledger.onnx["3"], Provenance(features=CANDIDATE))
    await register("ctr", ledger.onnx["3"], Provenance(features=CANDIDATE, label_source=SOURCE))
    await register("bare", ledger.onnx["3"], Provenance(features=CANDIDATE))
    sink = WarehouseSink(warehouse)  # the real SQL adapter, over the test's chdb
    sub = await serve_sql(nc, sink)
    try:
        t_from, t_to = (
            datetime.fromtimestamp(t / 1000, UTC).isoformat() for t in (ledger.t_from, ledger.t_to)
        )
        assert await backtest_command(settings, "ctr@v1", t_from, t_to) == 0
        out = capsys.readouterr().out
        want = await run_backtest(
            _query(warehouse),
            ledger.onnx["2"],
            _candidate(1, V2),
            SOURCE,
            ledger.t_from,
            ledger.t_to,
        )
        assert out == format_report(want) + "\n" and "candidate v1" in out
        with pytest.raises(NoLabelSource, match="bare v1"):
            await backtest_command(settings, "bare@1", t_from, t_to)
        with pytest.raises(BadTime, match="not before"):
            await backtest_command(settings, "ctr@1", t_to, t_from)
    finally:
        await sub.unsubscribe()
        sink._pool.shutdown(wait=True)  # not sink.close(): the session's warehouse stays open
