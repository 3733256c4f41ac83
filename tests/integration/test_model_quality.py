"""Outcomes joined to the inference ledger and quality per model version, hour and cohort
(myelin/quality.py) on real chdb, against an independent computation in Python with
scikit-learn (roc_auc_score) and numpy as the oracle."""

from __future__ import annotations

import math
import random
import time
from typing import Any

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from myelin.contracts import StreamEvent
from myelin.models import LabelSource
from myelin.quality import agreement_sql, outcomes_sql, quality_sql
from myelin.records import InferenceRecord, Prediction
from myelin.warehouse import Warehouse
from services.warehouse.sink import events_table, inferences_table
from tests.helpers import stream_event

pytestmark = pytest.mark.integration
HOUR = 3_600_000
WINDOW_S = 600


def _oracle(rows: list[dict[str, Any]]) -> dict[tuple[str, int, float], dict[str, float]]:
    groups: dict[tuple[str, int, float], list[tuple[float, int]]] = {}
    for r in rows:
        key = (r["version"], r["ts"] // HOUR * HOUR, r["cohort"])
        groups.setdefault(key, []).append((r["score"], r["label"]))
    out = {}
    for key, pairs in groups.items():
        s = np.array([p for p, _ in pairs])
        y = np.array([lab for _, lab in pairs])
        clipped = np.clip(s, 1e-15, 1 - 1e-15)
        bins = np.minimum(np.floor(s * 10), 9)
        ece = sum(abs((s[bins == b] - y[bins == b]).sum()) for b in range(10)) / len(s)
        out[key] = {
            "n": len(s),
            "positives": int(y.sum()),
            "auc": float(roc_auc_score(y, s)) if 0 < y.sum() < len(y) else math.nan,
            "logloss": float(-(y * np.log(clipped) + (1 - y) * np.log(1 - clipped)).mean()),
            "mean_score": float(s.mean()),
            "ece": float(ece),
        }
    return out


def test_quality_per_version_hour_and_cohort_matches_sklearn(warehouse: Warehouse) -> None:
    rng = random.Random(3)
    base = (int(time.time() * 1000) // HOUR - 6) * HOUR  # six hours ago, on the hour
    records: list[InferenceRecord] = []
    clicks: list[StreamEvent] = []
    truth: list[dict[str, Any]] = []
    for k in range(600):
        version = "1" if k % 3 else "2"
        ts = base + rng.randrange(2 * HOUR)  # two hours of traffic
        user = f"u{k}"
        score = rng.uniform(0.02, 0.98)
        clicks_1h = float(rng.randrange(6))
        # the outcome: a click by the user within the window (or too late, or never)
        r = rng.random()
        label = int(r < score)
        if label:
            clicks.append(stream_event(f"c{k}", user, ts + rng.randrange(1, WINDOW_S * 1000)))
        elif r < score + 0.2:
            clicks.append(stream_event(f"c{k}", user, ts + WINDOW_S * 1000 + 5000))  # too late
        records.append(
            InferenceRecord(
                request_id=f"r{k}",
                ts_ms=ts,
                api="predict",
                model="ctr",
                model_version=version,
                alias="champion",
                latency_us=1,
                trace_id="",
                route="champion",
                predictions=[Prediction(user, score, {"clicks_1h": clicks_1h}, 5, "FRESH", "")],
                rows=1,
            )
        )
        cohort = math.floor(clicks_1h / 2.0) * 2.0
        truth.append(
            {"version": version, "ts": ts, "score": score, "label": label, "cohort": cohort}
        )
    warehouse.insert_arrow("myelin.inferences", inferences_table(records))
    warehouse.insert_arrow(
        "myelin.events", events_table([(1000 * (i + 1), e) for i, e in enumerate(clicks)])
    )
    source = LabelSource(kind="event", event_type="click", window_s=WINDOW_S)

    outcomes = warehouse.query_arrow(outcomes_sql("ctr", source)).to_pylist()
    assert len(outcomes) == 600
    by_request = {o["request_id"]: o["label"] for o in outcomes}
    assert by_request == {f"r{k}": t["label"] for k, t in enumerate(truth)}

    for feature, width in (("", 1.0), ("clicks_1h", 2.0)):
        got = warehouse.query_arrow(
            quality_sql("ctr", source, cohort_feature=feature, cohort_width=width)
        ).to_pylist()
        rows = [{**t, "cohort": t["cohort"] if feature else 0.0} for t in truth]
        want = _oracle(rows)
        assert len(got) == len(want) and len(want) >= 4
        for g in got:
            key = (g["model_version"], int(g["hour"].timestamp() * 1000), float(g["cohort"]))
            w = want[key]
            assert (g["n"], g["positives"]) == (w["n"], w["positives"])
            for name in ("auc", "logloss", "mean_score", "ece"):
                assert g[name] == pytest.approx(w[name], rel=1e-9, abs=1e-12, nan_ok=True), name
            assert g["calibration_gap"] == pytest.approx(
                w["mean_score"] - w["positives"] / w["n"], rel=1e-9, abs=1e-12
            )


def test_outcomes_from_a_labels_stream_keyed_by_request_id(warehouse: Warehouse) -> None:
    base = int(time.time() * 1000) - HOUR
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
            predictions=[Prediction(f"u{k}", 0.1 * k, {}, 5, "FRESH", "")],
            rows=1,
        )
        for k in range(1, 6)
    ]
    warehouse.insert_arrow("myelin.inferences", inferences_table(records))
    labels = [
        stream_event(f"l{k}", f"u{k}", base + 10_000, typ="outcome", request_id=f"r{k}", label=v)
        for k, v in ((1, 0), (2, 1), (3, 1), (5, 0))  # r4 never labelled
    ]
    warehouse.insert_arrow(
        "myelin.events", events_table([(1000 * (i + 1), e) for i, e in enumerate(labels)])
    )
    source = LabelSource(kind="request", event_type="outcome")
    got = sorted(
        (r["request_id"], r["label"])
        for r in warehouse.query_arrow(outcomes_sql("ctr", source)).to_pylist()
    )
    assert got == [("r1", 0), ("r2", 1), ("r3", 1), ("r5", 0)]


def test_agreement_of_a_shadow_with_the_version_that_served(warehouse: Warehouse) -> None:
    """Pairs of rows (served, shadow) of one request, compared per hour: oracle numpy."""
    rng = random.Random(5)
    now = int(time.time() * 1000)
    served: list[InferenceRecord] = []
    shadow: list[InferenceRecord] = []
    pairs: list[tuple[int, float, float]] = []
    for k in range(300):
        a, b = rng.random(), rng.random()
        # 100 pairs in each of the three whole hours before this one (within the 4 h asked)
        ts = (now // HOUR - 3 + k % 3) * HOUR + rng.randrange(HOUR)
        for route, version, score, out in (
            ("champion", "1", a, served),
            ("shadow", "2", b, shadow),
        ):
            out.append(
                InferenceRecord(
                    request_id=f"r{k}",
                    ts_ms=ts,
                    api="predict",
                    model="ctr",
                    model_version=version,
                    alias=route,
                    latency_us=1,
                    trace_id="",
                    route=route,
                    predictions=[Prediction(f"u{k}", score, {}, 5, "FRESH", "")],
                    rows=1,
                )
            )
        pairs.append((ts // HOUR * HOUR, a, b))
    warehouse.insert_arrow("myelin.inferences", inferences_table(served + shadow))
    got = warehouse.query_arrow(agreement_sql("ctr", threshold=0.5, hours=4)).to_pylist()
    hours = sorted({h for h, _, _ in pairs})
    assert [int(g["hour"].timestamp() * 1000) for g in got] == hours
    for g in got:
        hour = int(g["hour"].timestamp() * 1000)
        sa = np.array([x for h, x, _ in pairs if h == hour])
        sb = np.array([y for h, _, y in pairs if h == hour])
        assert (g["served_version"], g["shadow_version"], g["n"]) == ("1", "2", len(sa))
        assert g["mean_abs_diff"] == pytest.approx(float(np.abs(sa - sb).mean()), rel=1e-9)
        assert g["max_abs_diff"] == pytest.approx(float(np.abs(sa - sb).max()), rel=1e-9)
        assert g["correlation"] == pytest.approx(float(np.corrcoef(sa, sb)[0, 1]), rel=1e-6)
        assert g["flips"] == int(((sa >= 0.5) != (sb >= 0.5)).sum())
