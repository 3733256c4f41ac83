"""The ops page's series from health snapshots (pure)."""

from __future__ import annotations

from typing import Any

from services.ops.series import Series, service_of


def snap(accepted: int, applied: int, *, f2_applied: int = 0, **extra: Any) -> dict[str, Any]:
    return {
        "ingest": {"accepted": accepted, "rejected": 1, "latency_ms": extra.get("lat", {})},
        "features": {
            "applied": applied,
            "late": 0,
            "version_lag_messages": {"v@1": 3},
            "freshness_ms": {"v@1": {"n": 4, "p50": 10.0, "p99": 40.0}},
        },
        "features-2": {
            "applied": f2_applied,
            "version_lag_messages": {"v@1": 2},
            "freshness_ms": {"v@1": {"n": 2, "p50": 12.0, "p99": 90.0}},
        },
        "inference": {"predictions": 0, "drift_score": {"ctr": 0.2, "other": 0.4}},
    }


def test_instances_belong_to_their_service() -> None:
    assert [service_of(n) for n in ("features-2", "features", "ingest-10", "a-b")] == [
        "features",
        "features",
        "ingest",
        "a-b",
    ]


def test_rates_sum_workers_and_percentiles_take_the_worst() -> None:
    s = Series()
    s.add(100.0, snap(0, 0))
    assert s.to_json()["t"] == []  # the first snapshot is the base of the rates
    lat = {"Predict": {"n": 5, "p50": 1.5, "p99": 7.0}}
    s.add(102.0, snap(2000, 1000, f2_applied=600, lat=lat))
    out = s.to_json()
    series = out["series"]
    assert out["t"] == [102.0]
    assert series["ingest_accepted_per_s"] == [1000.0]
    assert series["features_applied_per_s"] == [800.0]  # (1000 + 600) / 2 s, both workers
    assert series["ingest_rejected_per_s"] == [0.0]
    assert series["lag_messages"] == [5.0]
    assert series["freshness_p99_ms"] == [90.0] and series["freshness_p50_ms"] == [12.0]
    assert series["Predict_p99_ms"] == [7.0] and series["ModelInfer_p99_ms"] == [None]
    assert series["drift_score"] == [0.4]


def test_an_instance_that_missed_a_round_is_not_a_spike() -> None:
    s = Series()
    s.add(0.0, snap(1000, 5000, f2_applied=7000))
    missed = snap(1100, 5100)
    del missed["features-2"]  # no answer within the round
    s.add(1.0, missed)
    s.add(2.0, snap(1200, 5200, f2_applied=7100))  # back: counted from the next round
    s.add(3.0, snap(1300, 5300, f2_applied=7200))
    assert s.to_json()["series"]["features_applied_per_s"] == [100.0, 100.0, 200.0]


def test_a_restarted_counter_is_not_a_negative_rate_and_the_window_is_bounded() -> None:
    s = Series(window=3)
    s.add(0.0, snap(5000, 0))
    s.add(1.0, snap(100, 0))  # ingest restarted: counts from zero
    assert s.to_json()["series"]["ingest_accepted_per_s"] == [100.0]
    for k in range(2, 10):
        s.add(float(k), snap(100 + k, 0))
    out = s.to_json()
    assert out["t"] == [7.0, 8.0, 9.0]
    assert all(len(v) == 3 for v in out["series"].values())
