"""The SLO alert rules, checked as promtool checks them (structure, PromQL syntax,
durations), plus what promtool cannot know: every recorded series an alert reads is
recorded, every histogram threshold is a bucket bound, every burn-rate alert pairs a long
and a short window. That the metrics exist is checked against real scrapes in
tests/e2e/test_cli_up.py."""

from __future__ import annotations

import re
from pathlib import Path

import promql_parser
import pytest

from myelin import slis
from tests.prom_rules import rule_files, rules, selectors

FILES = rule_files()
BOUNDS = {str(float(b)) for b in (*slis.RPC_BUCKETS, *slis.FRESHNESS_BUCKETS)}


def test_there_are_rule_files() -> None:
    assert [p.name for p in FILES] == ["myelin-slos.rules.yml"]


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_every_rule_is_well_formed(path: Path) -> None:
    names: set[str] = set()
    for rule in rules(path):
        assert ("record" in rule) != ("alert" in rule), rule
        promql_parser.parse(rule["expr"])  # raises on a syntax error
        if "for" in rule:
            promql_parser.parse_duration(rule["for"])
        if "alert" in rule:
            assert rule["alert"] not in names, f"duplicate alert {rule['alert']}"
            names.add(rule["alert"])
            assert rule["labels"]["severity"] in ("page", "ticket"), rule
            assert rule["annotations"]["summary"] and rule["annotations"]["description"]
        else:
            assert re.fullmatch(r"[a-z_]+:[a-z_]+:[a-z0-9_]+", rule["record"]), rule


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_alerts_read_only_recorded_series_and_bucket_bounds(path: Path) -> None:
    all_rules = rules(path)
    recorded = {r["record"] for r in all_rules if "record" in r}
    for rule in all_rules:
        for sel in selectors(rule["expr"]):
            if ":" in sel.name:
                assert sel.name in recorded, f"{sel.name} is read but never recorded"
            for label, value in sel.labels:
                if label == "le":
                    assert value in BOUNDS, f"le={value} is not a bucket bound of myelin/slis.py"


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_burn_rate_alerts_pair_a_long_and_a_short_window(path: Path) -> None:
    burn = [r for r in rules(path) if "BudgetBurn" in r.get("alert", "")]
    assert len(burn) == 4
    for rule in burn:
        windows = [s.name.rsplit(":", 1)[1] for s in selectors(rule["expr"])]
        assert windows in (["rate1h", "rate5m"], ["rate6h", "rate30m"]), rule["alert"]
        factor = 14.4 if windows[0] == "rate1h" else 6
        assert rule["expr"].count(f"({factor} * 0.01)") == 2, rule["expr"]
