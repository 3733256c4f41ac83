from __future__ import annotations

from typing import Any

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader, NumberDataPoint

from myelin.telemetry import observe_status


def test_status_numbers_become_counters_and_gauges() -> None:
    status: dict[str, Any] = {
        "accepted": 5,
        "in_flight": 2,
        "rejected_by_reason": {"clock_skew": 1},
        "http": "http://x",
        "idle": True,
        "ts_ms": 123,
    }
    reader = InMemoryMetricReader()
    observe_status(MeterProvider(metric_readers=[reader]), "ingest", lambda: status)
    status["accepted"] = 7  # read at collection time, not at registration
    data = reader.get_metrics_data()
    assert data is not None
    points = {
        m.name: [
            (p.value, dict(p.attributes or {}))
            for p in m.data.data_points
            if isinstance(p, NumberDataPoint)
        ]
        for rm in data.resource_metrics
        for sm in rm.scope_metrics
        for m in sm.metrics
    }
    assert points["myelin_ingest_accepted"] == [(7.0, {})]
    assert points["myelin_ingest_in_flight"] == [(2.0, {})]
    assert points["myelin_ingest_rejected_by_reason"] == [(1.0, {"key": "clock_skew"})]
    assert points["myelin_ingest_idle"] == [(1.0, {})]
    assert "myelin_ingest_ts_ms" not in points and "myelin_ingest_http" not in points
