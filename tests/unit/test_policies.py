"""Every Rego policy, tested on the embedded evaluator governance runs (regopy): for each
policy an allowed input, and for each of its rules an input that triggers exactly that
reason. A policy file whose rules outnumber its cases fails the coverage check.

Rego-native tests (``*_test.rego`` with ``with input as``) are not used: regopy 1.5
crashes (SIGSEGV) evaluating ``with input as`` over rules that call ``object.get`` on the
input or test membership in a set literal, which most of these policies do."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import pytest

from services.governance.logic import interpret
from services.governance.policy_engines import RegoEngine, load_policies

POLICIES = Path(__file__).resolve().parents[2] / "myelin" / "policies"
ENGINE = RegoEngine(load_policies(POLICIES), "test")

GOOD_MODEL: dict[str, Any] = {
    "version": 3,
    "provenance": {"training_window": ["2026-11-01", "2026-11-30"], "feature_views": ["v@1"]},
    "metrics": {"auc": 0.71},
    "labels": {},
}


def model(**over: Any) -> dict[str, Any]:
    """GOOD_MODEL with whole top-level parts replaced."""
    return {**GOOD_MODEL, **over}


# (policy, input, None for allowed or the one reason expected, as a substring)
CASES: list[tuple[str, dict[str, Any], str | None]] = [
    # serve: may this model version serve?
    ("serve", {"model": model()}, None),
    (
        "serve",
        {"model": model(provenance={"feature_views": ["v@1"]})},
        "training_window is missing",
    ),
    (
        "serve",
        {"model": model(provenance={"training_window": ["a", "b"], "feature_views": []})},
        "feature_views is empty",
    ),
    ("serve", {"model": model(metrics={"auc": 0.52})}, "below the serving floor 0.55"),
    ("serve", {"model": model(metrics={})}, "validation AUC is not recorded"),
    ("serve", {"model": model(labels={"blocked": "true"})}, "model is labelled blocked"),
    # promote: may this version take this alias?
    ("promote", {"alias": "champion", "model": model(), "routes": {}}, None),
    ("promote", {"alias": "king", "model": model(), "routes": {}}, "unknown alias king"),
    (
        "promote",
        {"alias": "champion", "model": model(metrics={"auc": 0.58}), "routes": {}},
        "a champion needs a validation AUC of at least 0.6",
    ),
    (
        "promote",
        {"alias": "canary", "share": 0.8, "model": model(), "routes": {}},
        "a canary takes at most 50% of the traffic, not 80%",
    ),
    (
        "promote",
        {
            "alias": "canary",
            "model": model(metrics={"auc": 0.70, "champion_auc": 0.75}),
            "routes": {},
        },
        "below the champion's 0.750",
    ),
    (
        "promote",
        {"alias": "canary", "model": model(labels={"origin": "retrain"}), "routes": {}},
        "goes to canary only from shadow",
    ),
    (
        "promote",
        {"alias": "champion", "model": model(labels={"origin": "retrain"}), "routes": {}},
        "becomes champion only from canary",
    ),
    (
        "promote",
        {"alias": "shadow", "model": model(labels={"blocked": "true"}), "routes": {}},
        "model is labelled blocked",  # what may not serve may not take an alias
    ),
    # erasure: may this person be forgotten?
    ("erasure", {"requester": "operator", "reason": "DSR-17", "subject_hash": "s.ab"}, None),
    ("erasure", {"reason": "DSR-17"}, "an erasure needs a requester"),
    ("erasure", {"requester": "operator", "reason": "  "}, "an erasure needs a reason"),
    # backfill
    ("backfill", {"requester": "ana", "range_days": 30}, None),
    ("backfill", {"range_days": 30}, "backfill needs a requester"),
    ("backfill", {"requester": "ana", "range_days": 91}, "limited to 90 days"),
    # serve_view: may this view version be served?
    ("serve_view", {"requester": "ana", "lag_messages": 0, "behind_served_messages": 0}, None),
    ("serve_view", {"lag_messages": 0, "behind_served_messages": 0}, "promotion needs a requester"),
    (
        "serve_view",
        {"requester": "ana", "lag_messages": 5000, "behind_served_messages": 0},
        "5000 messages behind the stream",
    ),
    (
        "serve_view",
        {"requester": "ana", "lag_messages": 0, "behind_served_messages": 2000},
        "2000 messages behind the served version",
    ),
    # pii_read
    ("pii_read", {"role": "privacy_officer", "purpose": "erasure request 17"}, None),
    ("pii_read", {"role": "privacy_officer"}, "needs a stated purpose"),
    ("pii_read", {"role": "analyst", "purpose": "curiosity"}, "role analyst may not read"),
    # retention (more in tests/unit/test_retention.py)
    ("retention", {"resource": "table:events", "days": 400, "pii": True}, None),
    ("retention", {"resource": "table:events", "days": 0, "pii": True}, "finite retention"),
    ("retention", {"resource": "table:events", "days": 900, "pii": True}, "at most 730 days"),
    ("retention", {"resource": "table:audit", "days": 90, "pii": False}, "at least 2555 days"),
    ("retention", {"resource": "table:x", "days": -5, "pii": False}, "whole number of days"),
    ("retention", {"resource": "table:x", "days": "30", "pii": False}, "whole number of days"),
]


def decide(policy: str, doc: dict[str, Any]) -> tuple[bool, list[str]]:
    result = interpret(asyncio.run(ENGINE.evaluate(f"myelin.{policy}", doc)))
    return result.allow, list(result.reasons)


@pytest.mark.parametrize(
    ("policy", "doc", "reason"), CASES, ids=[f"{p}-{i}" for i, (p, _, _) in enumerate(CASES)]
)
def test_policy_case(policy: str, doc: dict[str, Any], reason: str | None) -> None:
    allow, reasons = decide(policy, doc)
    if reason is None:
        assert (allow, reasons) == (True, [])
    else:
        assert not allow
        assert len(reasons) == 1 and reason in reasons[0], reasons


def test_a_document_outside_the_bundle_is_queried_and_an_unknown_one_is_none() -> None:
    doc = {"model": model(labels={"blocked": "true"})}
    bundled = asyncio.run(ENGINE.evaluate("myelin.serve", doc))
    adhoc = asyncio.run(ENGINE.evaluate("myelin.serve.reasons", doc))  # not an entry point
    assert adhoc == bundled["reasons"] == ["model is labelled blocked"]
    assert asyncio.run(ENGINE.evaluate("myelin.no_such_policy", {})) is None  # no abort
    assert "myelin/serve" in ENGINE.entrypoints


def test_every_policy_and_every_rule_has_a_case() -> None:
    files = sorted(POLICIES.glob("*.rego"))
    assert files
    for f in files:
        policy = f.stem
        text = f.read_text()
        rules = len(re.findall(r"^reasons contains ", text, re.M))
        cases = [c for c in CASES if c[0] == policy]
        assert any(r is None for _, _, r in cases), f"{policy}: no allowed case"
        denied = [r for _, _, r in cases if r is not None]
        assert len(denied) >= rules, f"{policy}: {rules} rules, {len(denied)} refused cases"
