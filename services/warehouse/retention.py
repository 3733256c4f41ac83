"""Outbound adapter: applies the declared retention (:mod:`myelin.retention`) to the live
stores: each stream's max age, each warehouse table's TTL. A store already at its declared
retention is left alone; any other change is asked of governance first (action
``retention``, audited there) and applied only when allowed. A refusal keeps the current
retention and is reported with its reasons (``myelin status``, the warehouse's health).
The online store's limit (the longest TTL a view may set) is checked where views are
registered.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from myelin.decisions import GovernanceClient
from myelin.retention import DAY_S, RULES, Retention
from myelin.warehouse import DATABASE
from services.warehouse.sink import WarehouseSink

log = logging.getLogger(__name__)
Decide = Callable[[Retention, float], Awaitable[tuple[bool, list[str]]]]
NO_ANSWER = "governance did not answer"
_TTL = re.compile(r"\bTTL toDateTime\(`?(\w+)`?\) \+ toIntervalDay\((\d+)\)")


@dataclass
class RetentionReport:
    applied: dict[str, int] = field(default_factory=dict)  # resource -> days, changed now
    refused: dict[str, list[str]] = field(default_factory=dict)  # resource -> reasons
    unchanged: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # resource -> error (retried next start)

    @property
    def unsettled(self) -> bool:
        """A store still to try again: governance did not answer, or applying failed."""
        return bool(self.failed) or any(
            reasons and reasons[0].startswith(NO_ANSWER) for reasons in self.refused.values()
        )

    def status(self) -> dict[str, Any]:
        return {
            "applied": self.applied,
            "refused": self.refused,
            "unchanged": self.unchanged,
            "failed": self.failed,
        }


def ttl_days(engine_full: str) -> int:
    """The TTL of a MergeTree table in days, from ``system.tables.engine_full`` (0: none)."""
    m = _TTL.search(engine_full)
    return int(m.group(2)) if m else 0


async def _stream_days(js: JetStreamContext, name: str) -> float | None:
    """The stream's max age in days, exactly (12 hours is 0.5, not 0: forever)."""
    try:
        info = await js.stream_info(name)
    except NotFoundError:
        return None  # not provisioned here: nothing to change
    return (info.config.max_age or 0) / DAY_S


async def _table_days(sink: WarehouseSink, table: str) -> float | None:
    rows = (
        await sink.query(
            "SELECT engine_full FROM system.tables "
            f"WHERE database = '{DATABASE}' AND name = '{table}'"
        )
    ).to_pylist()
    return ttl_days(str(rows[0]["engine_full"])) if rows else None


async def _apply(js: JetStreamContext, sink: WarehouseSink, r: Retention) -> None:
    if r.kind == "stream":
        cfg = (await js.stream_info(r.name)).config
        cfg.max_age = r.seconds
        await js.update_stream(cfg)
    else:
        ttl = f"TTL toDateTime({r.column}) + INTERVAL {r.days} DAY" if r.days else "REMOVE TTL"
        verb = "MODIFY " + ttl if r.days else ttl
        # existing parts are not rewritten now: expired rows go at the next merges
        await sink.run(
            sink.wh.command,
            f"ALTER TABLE {DATABASE}.{r.name} {verb} SETTINGS materialize_ttl_after_modify = 0",
        )


def governed_retention(client: GovernanceClient) -> Decide:
    """Asks governance (action ``retention``) whether a resource may change to its declared
    retention; an unreachable governance is a refusal (the current retention stays)."""

    async def decide(r: Retention, current_days: float) -> tuple[bool, list[str]]:
        try:
            verdict = await client.decide(
                "retention",
                r.resource,
                {
                    "resource": r.resource,
                    "kind": r.kind,
                    "days": r.days,
                    "current_days": current_days,
                    "pii": r.pii,
                },
            )
        except Exception as exc:  # noqa: BLE001 - not decided: not changed
            return False, [f"{NO_ANSWER} ({type(exc).__name__}: {exc}); not changed"]
        return verdict.allow, list(verdict.reasons)

    return decide


async def apply_retention(
    js: JetStreamContext,
    sink: WarehouseSink,
    decide: Decide,
    rules: tuple[Retention, ...] = RULES,
) -> RetentionReport:
    report = RetentionReport()
    silent: list[str] | None = None  # governance did not answer: not asked again this round
    for r in rules:
        if r.kind == "online":
            continue
        try:
            current = (
                await _stream_days(js, r.name)
                if r.kind == "stream"
                else await _table_days(sink, r.name)
            )
            if current is None or abs(current - r.days) * DAY_S < 1:
                report.unchanged.append(r.resource)
                continue
            if silent is not None:
                allow, reasons = False, silent
            else:
                allow, reasons = await decide(r, current)
                if not allow and reasons and reasons[0].startswith(NO_ANSWER):
                    silent = reasons
            if not allow:
                report.refused[r.resource] = reasons
                log.error(
                    "retention of %s stays %g days: governance refused %d days: %s",
                    r.resource,
                    current,
                    r.days,
                    "; ".join(reasons),
                )
                continue
            await _apply(js, sink, r)
        except Exception as exc:  # noqa: BLE001 - one store's trouble: the others go on
            report.failed[r.resource] = f"{type(exc).__name__}: {exc}"[:500]
            log.error("retention of %s not applied: %r", r.resource, exc)
            continue
        report.applied[r.resource] = r.days
        log.info("retention of %s: %g -> %d days", r.resource, current, r.days)
    return report


async def keep_applying(
    js: JetStreamContext,
    sink: WarehouseSink,
    decide: Decide,
    first: RetentionReport,
    on_report: Callable[[RetentionReport], None],
    every_s: float = 60.0,
    rules: tuple[Retention, ...] = RULES,
) -> None:
    """While a store is unsettled (governance did not answer, or a change failed), try
    again every ``every_s``: a warehouse that started while governance was down must not
    keep personal data past its retention until its next restart. A refusal with reasons
    is a decision, not retried. Runs until cancelled."""
    report = first
    while report.unsettled:
        await asyncio.sleep(every_s)
        try:
            again = await apply_retention(js, sink, decide, rules)
        except Exception as exc:  # noqa: BLE001 - tried again next round
            log.warning("retention round failed: %r", exc)
            continue
        again.applied = {**report.applied, **again.applied}
        report = again
        on_report(report)
