"""How long the platform keeps what it stores, declared in one place: every JetStream
stream (max age), every ClickHouse table (a TTL on its time column) and the online store
(the longest TTL a feature view may set). Defaults below; ``myelin/topology.py`` builds
the streams (and ``infra/terraform/topology.json``) from it, the warehouse applies it,
and any change to a running deployment is decided by governance (``retention.rego``)
before it is applied, and audited.

0 days means "kept until deleted" (only for what holds no personal data).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from myelin.subjects import (
    AUDIT_STREAM,
    DLQ_STREAM,
    DRIFT_STREAM,
    EVENTS_STREAM,
    FEATURES_STREAM,
    INFERENCES_STREAM,
    INGEST_STREAM,
    LATE_STREAM,
)

DAY_S = 86_400.0


@dataclass(frozen=True)
class Retention:
    """``resource``: ``stream:<name>``, ``table:<name>`` or ``online``. ``column``: the
    time column a table's TTL counts from. ``pii``: holds personal data (ids, tokens or
    raw payloads)."""

    resource: str
    days: int
    pii: bool
    why: str
    column: str = ""

    @property
    def kind(self) -> Literal["stream", "table", "online"]:
        kind = self.resource.split(":", 1)[0]
        assert kind in ("stream", "table", "online"), self.resource
        return kind  # type: ignore[return-value]

    @property
    def name(self) -> str:
        return self.resource.split(":", 1)[-1]

    @property
    def seconds(self) -> float:
        return self.days * DAY_S


RULES: tuple[Retention, ...] = (
    # streams
    Retention(f"stream:{INGEST_STREAM}", 7, True, "the raw-JSON inbox: ingest reads it at once"),
    Retention(f"stream:{EVENTS_STREAM}", 400, True, "replayable history: a year and a margin"),
    Retention(f"stream:{LATE_STREAM}", 30, True, "late marks, drained to the warehouse"),
    Retention(f"stream:{FEATURES_STREAM}", 7, True, "derived rows, rebuilt by replay"),
    Retention(f"stream:{INFERENCES_STREAM}", 30, True, "the ledger, drained to the warehouse"),
    Retention(f"stream:{AUDIT_STREAM}", 2557, False, "decisions: seven years"),
    Retention(f"stream:{DLQ_STREAM}", 30, True, "rejected payloads (sanitized): a month to act"),
    Retention(f"stream:{DRIFT_STREAM}", 365, False, "drift records"),
    # ClickHouse tables
    Retention("table:events", 400, True, "raw history for analysts", "ingest_time"),
    Retention("table:feature_values", 400, True, "point-in-time training rows", "as_of"),
    Retention("table:inferences", 365, True, "the inference ledger", "ts"),
    Retention("table:audit", 2557, False, "governance decisions: seven years", "ts"),
    Retention("table:dead_letters", 30, True, "rejected payloads (sanitized)", "ts"),
    Retention("table:drift_events", 365, False, "drift records", "ts"),
    # Redis: the longest TTL a feature view may set on its online state
    Retention("online", 30, True, "online feature state (each view sets its ttl_s below this)"),
)


def rule(resource: str, rules: tuple[Retention, ...] = RULES) -> Retention:
    for r in rules:
        if r.resource == resource:
            return r
    raise KeyError(f"no retention declared for {resource!r}")


def stream_max_age_s(stream: str) -> float:
    return rule(f"stream:{stream}").seconds


def online_max_ttl_s() -> float:
    return rule("online").seconds
