"""Pure logic of the ops page: successive health snapshots of every service -> the time
series the page plots (rates from counter deltas, lags, percentiles).

A snapshot is ``{instance: health reply}`` (``features``, ``features-2``, ``ingest`` ...),
one per second. Rates sum each instance's own growth (an instance missing from either
snapshot adds nothing); a counter that goes backwards (a restarted process) counts from
zero again instead of a negative rate.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

Health = Mapping[str, Any]
Snapshot = Mapping[str, Health]

# (series name, service, status counter): plotted as a rate per second
RATES: tuple[tuple[str, str, str], ...] = (
    ("ingest_accepted_per_s", "ingest", "accepted"),
    ("ingest_rejected_per_s", "ingest", "rejected"),
    ("features_applied_per_s", "features", "applied"),
    ("features_late_per_s", "features", "late"),
    ("predictions_per_s", "inference", "predictions"),
    ("decisions_per_s", "governance", "decisions"),
    ("denials_per_s", "governance", "denials"),
)
LATENCY_RPCS = ("Predict", "ModelInfer", "ingest_http", "governance_decide")
WINDOW = 600  # points kept: ten minutes at one a second


def service_of(instance: str) -> str:
    """``features-2`` -> ``features``."""
    head, _, tail = instance.rpartition("-")
    return head if head and tail.isdigit() else instance


def _counter(h: Health, key: str) -> float:
    v = h.get(key, 0)
    return float(v) if isinstance(v, int | float) else 0.0


def _delta(before: Snapshot, snap: Snapshot, service: str, key: str) -> float:
    """How much ``key`` grew over the service's instances, each against its own previous
    value: an instance that did not answer last time (or is new) adds nothing this time,
    and one whose counter went back (a restart) counts from zero."""
    total = 0.0
    for inst, h in snap.items():
        if service_of(inst) != service or inst not in before:
            continue
        now, then = _counter(h, key), _counter(before[inst], key)
        total += now - then if now >= then else now
    return total


def _pct(snap: Snapshot, field_: str, key: str, which: str) -> float | None:
    """The worst ``which`` percentile of ``field_[key]`` over the instances that have it."""
    values = [
        float(h[field_][key][which])
        for h in snap.values()
        if isinstance(h.get(field_), dict)
        and isinstance(h[field_].get(key), dict)
        and which in h[field_][key]
    ]
    return max(values) if values else None


def lag_messages(snap: Snapshot) -> float:
    """Messages the features versions have left, over every worker and version."""
    return sum(
        float(v)
        for inst, h in snap.items()
        if service_of(inst) == "features"
        for v in (h.get("version_lag_messages") or {}).values()
        if isinstance(v, int | float)
    )


def drift(snap: Snapshot) -> float | None:
    """The highest drift score any model reports (None: no drift window yet)."""
    scores = [
        float(v)
        for inst, h in snap.items()
        if service_of(inst) == "inference"
        for v in (h.get("drift_score") or {}).values()
        if isinstance(v, int | float)
    ]
    return max(scores) if scores else None


@dataclass
class Series:
    """The page's time series: ``t`` (unix seconds) and one list per series, aligned."""

    window: int = WINDOW
    t: deque[float] = field(default_factory=deque)
    values: dict[str, deque[float | None]] = field(default_factory=dict)
    _last: tuple[float, Snapshot] | None = None

    def names(self) -> list[str]:
        return [
            *(name for name, _, _ in RATES),
            "lag_messages",
            "freshness_p50_ms",
            "freshness_p99_ms",
            *(f"{rpc}_{q}_ms" for rpc in LATENCY_RPCS for q in ("p50", "p99")),
            "drift_score",
        ]

    def add(self, now: float, snap: Snapshot) -> None:
        """One snapshot taken at ``now``. The first one only sets the base of the rates."""
        last, self._last = self._last, (now, snap)
        if last is None:
            return
        then, before = last
        dt = max(now - then, 1e-3)
        point: dict[str, float | None] = {}
        for name, service, key in RATES:
            point[name] = _delta(before, snap, service, key) / dt
        point["lag_messages"] = lag_messages(snap)
        views = {v for h in snap.values() for v in (h.get("freshness_ms") or {})}
        for q in ("p50", "p99"):
            worst = [_pct(snap, "freshness_ms", v, q) for v in views]
            known = [w for w in worst if w is not None]
            point[f"freshness_{q}_ms"] = max(known) if known else None
            for rpc in LATENCY_RPCS:
                point[f"{rpc}_{q}_ms"] = _pct(snap, "latency_ms", rpc, q)
        point["drift_score"] = drift(snap)
        self.t.append(now)
        for name in self.names():
            self.values.setdefault(name, deque()).append(point.get(name))
        while len(self.t) > self.window:
            self.t.popleft()
            for q_ in self.values.values():
                q_.popleft()

    def to_json(self) -> dict[str, Any]:
        return {"t": list(self.t), "series": {k: list(v) for k, v in self.values.items()}}
