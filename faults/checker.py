"""The fault harness's checker: pure functions, no I/O.

Every event the load generator got acknowledged is classified, in Jepsen's terms, by its
*effect* (the feature rows the pipeline derived from it: exactly one per applied event)
and by its presence in raw history:

- **stored once**: one effect;
- **lost**: no effect (or absent from raw history);
- **duplicated**: more than one effect (the same event counted twice).

The final state (online vectors in Redis, aggregates and last feature rows in ClickHouse)
is then compared with an undisturbed run of the same events.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field


@dataclass
class Classification:
    stored_once: int = 0
    lost: int = 0
    duplicated: int = 0
    missing_raw: int = 0  # acknowledged, but not in ClickHouse raw history
    lost_ids: list[str] = field(default_factory=list)
    duplicated_ids: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.lost or self.duplicated or self.missing_raw)


def classify(
    acked: Iterable[str], effects: Mapping[str, int], raw_history: Mapping[str, int]
) -> Classification:
    """``effects``: event id -> feature rows derived from it; ``raw_history``: event id ->
    rows in raw history (deduplicated)."""
    c = Classification()
    for eid in acked:
        n = effects.get(eid, 0)
        if n == 1:
            c.stored_once += 1
        elif n == 0:
            c.lost += 1
            if len(c.lost_ids) < 20:
                c.lost_ids.append(eid)
        else:
            c.duplicated += 1
            if len(c.duplicated_ids) < 20:
                c.duplicated_ids.append(eid)
        if not raw_history.get(eid):
            c.missing_raw += 1
    return c


@dataclass
class FinalState:
    """What a run left behind, in a form two runs can be compared in."""

    vectors: dict[str, tuple[int, tuple[float, ...]]]  # entity -> (as_of ms, online values)
    aggregates: dict[str, float]  # e.g. "events.purchase.count", "events.purchase.amount"
    rows_per_entity: dict[str, int]  # feature rows (one per applied event)
    last_rows: dict[str, tuple[float, ...]]  # entity -> values of its newest feature row


def same(a: float, b: float, rel_tol: float) -> bool:
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return abs(a - b) <= rel_tol * max(1.0, abs(a), abs(b))


def _values_differ(a: tuple[float, ...], b: tuple[float, ...], rel_tol: float) -> bool:
    return len(a) != len(b) or not all(same(x, y, rel_tol) for x, y in zip(a, b, strict=True))


def compare(got: FinalState, want: FinalState, rel_tol: float = 1e-9) -> list[str]:
    """Every difference between ``got`` (the faulted run) and ``want`` (undisturbed), in
    words (empty: equal). Floats may differ in the last bits: events of one entity can be
    applied in another order under faults, and sums then add up in another order."""
    diffs: list[str] = []
    for name, (label_a, label_b) in {
        "entities online": (set(got.vectors), set(want.vectors)),
        "entities with feature rows": (set(got.rows_per_entity), set(want.rows_per_entity)),
    }.items():
        if label_a != label_b:
            diffs.append(
                f"{name}: {len(label_a - label_b)} extra, {len(label_b - label_a)} missing"
            )
    for e in sorted(set(got.vectors) & set(want.vectors)):
        (as_of_a, va), (as_of_b, vb) = got.vectors[e], want.vectors[e]
        if as_of_a != as_of_b or _values_differ(va, vb, rel_tol):
            diffs.append(f"online {e}: as_of {as_of_a} {va} != {as_of_b} {vb}")
    for k in sorted(set(got.aggregates) | set(want.aggregates)):
        a, b = got.aggregates.get(k, math.nan), want.aggregates.get(k, math.nan)
        if not same(a, b, rel_tol):
            diffs.append(f"aggregate {k}: {a} != {b}")
    for e in sorted(set(got.rows_per_entity) & set(want.rows_per_entity)):
        if got.rows_per_entity[e] != want.rows_per_entity[e]:
            diffs.append(
                f"feature rows of {e}: {got.rows_per_entity[e]} != {want.rows_per_entity[e]}"
            )
    for e in sorted(set(got.last_rows) & set(want.last_rows)):
        if _values_differ(got.last_rows[e], want.last_rows[e], rel_tol):
            diffs.append(f"last feature row of {e}: {got.last_rows[e]} != {want.last_rows[e]}")
    return diffs
