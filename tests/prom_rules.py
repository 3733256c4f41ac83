"""Reads deploy/prometheus/*.rules.yml the way promtool checks them: YAML structure,
every expression parsed by a PromQL parser (the Prometheus grammar, in Rust), and the
series each expression selects (for checks against what the services export)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import promql_parser
import yaml

RULES_DIR = Path(__file__).resolve().parents[1] / "deploy" / "prometheus"


@dataclass(frozen=True)
class Selector:
    name: str
    labels: tuple[tuple[str, str], ...]  # (label, value or regex) as written


def rule_files() -> list[Path]:
    return sorted(RULES_DIR.glob("*.rules.yml"))


def load(path: Path) -> list[dict[str, Any]]:
    doc = yaml.safe_load(path.read_text())
    groups: list[dict[str, Any]] = doc["groups"]
    return groups


def rules(path: Path) -> list[dict[str, Any]]:
    return [r for g in load(path) for r in g["rules"]]


def selectors(expr: str) -> list[Selector]:
    out: list[Selector] = []

    def walk(node: Any) -> None:
        if type(node).__name__ == "VectorSelector":
            labels = tuple((m.name, m.value) for m in node.matchers.matchers)
            out.append(Selector(node.name, labels))
            return
        for attr in ("lhs", "rhs", "expr", "args", "vector_selector", "param"):
            child = getattr(node, attr, None)
            for c in child if isinstance(child, list) else [child]:
                if c is not None:
                    walk(c)

    walk(promql_parser.parse(expr))
    return out
