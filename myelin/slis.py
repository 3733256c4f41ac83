"""Service level indicators as metrics: latency and freshness histograms with fixed
buckets (the alert rules in ``deploy/prometheus/`` compute their SLO burn rates from
them), and consumer lag per durable.

Exported, next to each service's status counters (:mod:`myelin.telemetry`):

- ``myelin_rpc_duration_seconds{rpc, outcome}``: one observation per request at every
  door (ingest HTTP and NATS, the gRPC methods of inference, governance decisions);
- ``myelin_features_freshness_seconds{view}``: per committed batch, how long its oldest
  event took from ingest's accept to being visible in the online store (one observation
  per batch: the batch's worst case);
- ``myelin_consumer_lag_messages{durable}`` and ``myelin_consumer_lag_seconds{durable}``:
  what every pull consumer of the process has left, and how far behind the stream it is.

Recording costs one histogram update per request or per batch, never per event. The last
minute of observations is also kept in memory, for the health reply's ``latency_ms`` and
``freshness_ms`` percentiles (what ``myelin status`` and the ops page show).
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections import deque
from collections.abc import Iterator
from typing import Any

from opentelemetry import metrics
from opentelemetry.sdk.metrics.view import ExplicitBucketHistogramAggregation, View

RPC_DURATION = "myelin_rpc_duration_seconds"
FRESHNESS = "myelin_features_freshness_seconds"
CONSUMER_LAG_MESSAGES = "myelin_consumer_lag_messages"
CONSUMER_LAG_SECONDS = "myelin_consumer_lag_seconds"
# Bucket bounds, seconds. The SLO thresholds of the alert rules are bounds here.
RPC_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
FRESHNESS_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def views() -> list[View]:
    """The bucket bounds, for the process's MeterProvider."""
    return [
        View(
            instrument_name=RPC_DURATION,
            aggregation=ExplicitBucketHistogramAggregation(RPC_BUCKETS),
        ),
        View(
            instrument_name=FRESHNESS,
            aggregation=ExplicitBucketHistogramAggregation(FRESHNESS_BUCKETS),
        ),
    ]


@functools.cache
def _meter() -> metrics.Meter:
    # a proxy until the service installs its provider, then the real one
    return metrics.get_meter("myelin.sli")


@functools.cache
def _rpc_duration() -> metrics.Histogram:
    return _meter().create_histogram(
        RPC_DURATION, unit="s", description="request latency at each door"
    )


@functools.cache
def _freshness() -> metrics.Histogram:
    return _meter().create_histogram(
        FRESHNESS, unit="s", description="ingest accept -> visible online, per batch"
    )


@contextlib.contextmanager
def timed(rpc: str) -> Iterator[dict[str, str]]:
    """Times the block as one request of ``rpc``. The caller may set ``outcome`` in the
    yielded attributes (``ok`` by default; ``error`` when the block raises)."""
    attrs = {"rpc": rpc, "outcome": "ok"}
    started = time.perf_counter()
    try:
        yield attrs
    except BaseException:
        if attrs["outcome"] == "ok":  # the caller may have said "rejected" already
            attrs["outcome"] = "error"
        raise
    finally:
        took = time.perf_counter() - started
        _rpc_duration().record(took, attrs)
        _remember(_LATENCY, rpc, took)


def outcome_of_status(status: int) -> str:
    """``ok`` (2xx), ``rejected`` (4xx: the caller's input) or ``error`` (5xx)."""
    return "ok" if status < 400 else "rejected" if status < 500 else "error"


def record_freshness(view: str, seconds: float) -> None:
    seconds = max(seconds, 0.0)
    _freshness().record(seconds, {"view": view})
    _remember(_FRESHNESS, view, seconds)


RECENT_S = 60.0  # the window of the in-memory percentiles
_RECENT_MAX = 4096  # observations kept per key (the newest)
_LATENCY: dict[str, deque[tuple[float, float]]] = {}
_FRESHNESS: dict[str, deque[tuple[float, float]]] = {}


def _remember(table: dict[str, deque[tuple[float, float]]], key: str, seconds: float) -> None:
    q = table.get(key)
    if q is None:
        q = table[key] = deque(maxlen=_RECENT_MAX)
    q.append((time.monotonic(), seconds))


def percentiles(values: list[float]) -> dict[str, float]:
    """p50, p99 and max in milliseconds, and the count, of ``values`` (seconds)."""
    if not values:
        return {"n": 0}
    xs = sorted(values)
    n = len(xs)
    return {
        "n": n,
        "p50": round(xs[(n - 1) // 2] * 1000, 3),
        "p99": round(xs[max(0, -(-99 * n // 100) - 1)] * 1000, 3),  # nearest rank
        "max": round(xs[-1] * 1000, 3),
    }


def recent() -> dict[str, Any]:
    """The last minute's latency per rpc and freshness per view (ms percentiles)."""
    since = time.monotonic() - RECENT_S

    def summary(table: dict[str, deque[tuple[float, float]]]) -> dict[str, Any]:
        return {k: percentiles([v for t, v in list(q) if t >= since]) for k, q in table.items()}

    return {"latency_ms": summary(_LATENCY), "freshness_ms": summary(_FRESHNESS)}
