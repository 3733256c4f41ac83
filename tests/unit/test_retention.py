"""The retention declaration (myelin/retention.py) and its policy (retention.rego),
evaluated by the real embedded Rego engine: every declared default is allowed, and the
changes the policy exists to stop are refused with their reasons."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import pytest

from myelin import retention, topology
from myelin.settings import Settings
from myelin.warehouse import DDL
from services.features.views import USER_ACTIVITY, Feature, FeatureView
from services.governance.logic import interpret
from services.governance.policy_engines import RegoEngine, load_policies
from services.warehouse.retention import ttl_days

ROOT = Path(__file__).resolve().parents[2]
ENGINE = RegoEngine(load_policies(ROOT / "myelin" / "policies"), "test")


def decide(doc: dict[str, Any]) -> tuple[bool, list[str]]:
    result = interpret(asyncio.run(ENGINE.evaluate("myelin.retention", doc)))
    return result.allow, list(result.reasons)


def doc(r: retention.Retention, **over: Any) -> dict[str, Any]:
    return {"resource": r.resource, "kind": r.kind, "days": r.days, "pii": r.pii, **over}


def test_every_store_has_one_declared_retention() -> None:
    resources = [r.resource for r in retention.RULES]
    assert len(resources) == len(set(resources))
    streams = {s.name for s in topology.streams(Settings())}
    assert {r.name for r in retention.RULES if r.kind == "stream"} == streams
    tables = {m.group(1) for m in (re.search(r"\.(\w+) \(", stmt) for stmt in DDL) if m}
    assert {r.name for r in retention.RULES if r.kind == "table"} == tables
    assert [r.resource for r in retention.RULES if r.kind == "online"] == ["online"]
    for spec in topology.streams(Settings()):  # the streams are built from it
        assert spec.max_age_s == retention.stream_max_age_s(spec.name)


@pytest.mark.parametrize("rule", retention.RULES, ids=lambda r: r.resource)
def test_the_declared_defaults_are_allowed(rule: retention.Retention) -> None:
    assert decide(doc(rule)) == (True, [])


@pytest.mark.parametrize(
    ("resource", "over", "reason"),
    [
        ("table:events", {"days": 0}, "personal data needs a finite retention"),
        ("stream:MYELIN_EVENTS", {"days": 1000}, "at most 730 days, not 1000"),
        ("table:audit", {"days": 30}, "audit records must be kept at least 2555 days, not 30"),
        ("stream:MYELIN_AUDIT", {"days": 365}, "at least 2555 days"),
        ("table:drift_events", {"days": -1}, "a whole number of days"),
        ("table:drift_events", {"days": "forever"}, "a whole number of days"),
    ],
)
def test_what_the_policy_refuses(resource: str, over: dict[str, Any], reason: str) -> None:
    allow, reasons = decide(doc(retention.rule(resource), **over))
    assert not allow and any(reason in r for r in reasons), reasons


def test_ttl_of_a_table_as_the_engine_reports_it() -> None:
    full = "ReplacingMergeTree ORDER BY ts TTL toDateTime(ts) + toIntervalDay(30) SETTINGS x = 1"
    assert ttl_days(full) == 30
    assert ttl_days("ReplacingMergeTree ORDER BY ts SETTINGS index_granularity = 8192") == 0


def test_a_view_cannot_keep_online_state_past_the_online_retention() -> None:
    longest = int(retention.online_max_ttl_s())
    FeatureView(
        name="ok",
        entity="user_id",
        sources=("click",),
        ttl_s=longest,
        features=(Feature("c", "count", 600, "click"),),
    )
    with pytest.raises(ValueError, match="longer than the online store's retention"):
        FeatureView(
            name="too_long",
            entity="user_id",
            sources=("click",),
            ttl_s=longest + 1,
            features=(Feature("c", "count", 600, "click"),),
        )
    assert USER_ACTIVITY.ttl_s <= longest
