"""Drift and shadow figures of the inference status are exported as Prometheus metrics:
breaches as a counter per version, the latest figures as a gauge per version, feature and
figure, present from the start even while nothing has been judged."""

from __future__ import annotations

from typing import Any

from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.sdk.metrics import MeterProvider
from prometheus_client import REGISTRY, generate_latest

from myelin.telemetry import observe_status


def test_drift_figures_are_metrics_even_when_they_start_empty() -> None:
    status: dict[str, Any] = {"drift_detected": {}, "drift_score": {}, "shadow_scored": 0}
    reader = PrometheusMetricReader()  # serves through prometheus_client's registry
    provider = MeterProvider(metric_readers=[reader])
    observe_status(provider, "inference", lambda: status)
    status.update(
        drift_detected={"ctr:v1": 2},
        drift_score={"ctr:v1:clicks_1h:psi": 0.31},
        shadow_scored=5,
    )
    text = generate_latest(REGISTRY).decode()
    assert 'myelin_inference_drift_detected_total{key="ctr:v1"' in text
    assert 'myelin_inference_drift_score{key="ctr:v1:clicks_1h:psi"' in text
    line = next(x for x in text.splitlines() if x.startswith("myelin_inference_drift_score{"))
    assert line.endswith(" 0.31")
    provider.shutdown()
