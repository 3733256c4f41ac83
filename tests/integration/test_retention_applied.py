"""Retention applied to live stores (real nats-server, chdb, Rego): a fresh deployment is
created at its declared retention and nothing is asked; a deployment whose stores differ
is changed only where governance allows, each change audited; a refusal or a silent
governance leaves the current retention in place, with the reasons."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import replace

import msgspec
import pytest
from nats.aio.client import Client as NATS

from myelin import bus, retention
from myelin.decisions import GovernanceClient
from myelin.records import AuditRecord
from myelin.retention import DAY_S
from myelin.settings import Settings
from myelin.subjects import AUDIT_STREAM, EVENTS_STREAM
from myelin.warehouse import Warehouse
from services.governance.app import GovernanceApp
from services.warehouse.retention import (
    RetentionReport,
    apply_retention,
    governed_retention,
    keep_applying,
    ttl_days,
)
from services.warehouse.sink import WarehouseSink

pytestmark = pytest.mark.integration


@pytest.fixture
async def governance(nc: NATS, settings: Settings) -> AsyncIterator[GovernanceApp]:
    app = GovernanceApp(settings)
    await app.start()
    try:
        yield app
    finally:
        await app.stop()


@pytest.fixture
def sink(warehouse: Warehouse) -> WarehouseSink:
    return WarehouseSink(warehouse)  # the session's engine: not closed here


def table_ttl(warehouse: Warehouse, table: str) -> int:
    rows = warehouse.query_arrow(
        f"SELECT engine_full FROM system.tables WHERE database = 'myelin' AND name = '{table}'"
    ).to_pylist()
    return ttl_days(str(rows[0]["engine_full"]))


async def retention_decisions(nc: NATS, settings: Settings) -> list[AuditRecord]:
    js = bus.jetstream(nc, settings)
    for _ in range(50):
        if (await js.stream_info(AUDIT_STREAM)).state.messages:
            break
        await asyncio.sleep(0.05)
    n = (await js.stream_info(AUDIT_STREAM)).state.messages
    if not n:
        return []
    sub = await js.pull_subscribe("myelin.audit.retention", stream=AUDIT_STREAM)
    try:
        msgs = await sub.fetch(n, timeout=2)
    finally:
        await sub.unsubscribe()
    return [msgspec.msgpack.decode(m.data, type=AuditRecord) for m in msgs]


async def test_a_fresh_deployment_is_at_its_declared_retention(
    nc: NATS,
    settings: Settings,
    governance: GovernanceApp,
    sink: WarehouseSink,
    warehouse: Warehouse,
) -> None:
    js = bus.jetstream(nc, settings)
    for r in retention.RULES:
        if r.kind == "stream":
            assert (await js.stream_info(r.name)).config.max_age == r.seconds, r.resource
        elif r.kind == "table":
            assert table_ttl(warehouse, r.name) == r.days, r.resource
    report = await apply_retention(js, sink, governed_retention(GovernanceClient(nc)))
    assert report.applied == {} and report.refused == {}
    assert governance.decider is not None and governance.decider.decisions == 0


async def test_a_change_is_applied_only_where_governance_allows_and_is_audited(
    nc: NATS,
    settings: Settings,
    governance: GovernanceApp,
    sink: WarehouseSink,
    warehouse: Warehouse,
) -> None:
    js = bus.jetstream(nc, settings)
    # a deployment from an older build: EVENTS kept forever, no TTL on the events table
    cfg = (await js.stream_info(EVENTS_STREAM)).config
    cfg.max_age = 0
    await js.update_stream(cfg)
    warehouse.command("ALTER TABLE myelin.events REMOVE TTL")
    # and a declaration that asks for too short an audit trail
    too_short = replace(retention.rule("table:audit"), days=30)
    rules = (
        retention.rule(f"stream:{EVENTS_STREAM}"),
        retention.rule("table:events"),
        too_short,
    )
    report = await apply_retention(js, sink, governed_retention(GovernanceClient(nc)), rules)

    assert report.applied == {f"stream:{EVENTS_STREAM}": 400, "table:events": 400}
    assert (await js.stream_info(EVENTS_STREAM)).config.max_age == 400 * DAY_S
    assert table_ttl(warehouse, "events") == 400
    assert list(report.refused) == ["table:audit"]
    assert "audit records must be kept at least 2555 days, not 30" in report.refused["table:audit"]
    assert table_ttl(warehouse, "audit") == retention.rule("table:audit").days  # unchanged
    decisions = await retention_decisions(nc, settings)
    assert sorted((d.subject, d.allow) for d in decisions) == [
        (f"stream:{EVENTS_STREAM}", True),
        ("table:audit", False),
        ("table:events", True),
    ]
    assert (
        '"current_days":0' in next(d for d in decisions if d.subject == "table:events").input_json
    )


async def test_provisioning_never_changes_an_existing_streams_retention(
    nc: NATS, settings: Settings
) -> None:
    js = bus.jetstream(nc, settings)
    cfg = (await js.stream_info(EVENTS_STREAM)).config
    cfg.max_age = 12 * 3600.0  # half a day: not "forever", not the declared 400 days
    await js.update_stream(cfg)
    await bus.provision(js, settings)
    assert (await js.stream_info(EVENTS_STREAM)).config.max_age == 12 * 3600.0


async def test_without_an_answer_from_governance_nothing_changes(
    nc: NATS, settings: Settings, sink: WarehouseSink, warehouse: Warehouse
) -> None:
    js = bus.jetstream(nc, settings)
    warehouse.command("ALTER TABLE myelin.dead_letters REMOVE TTL")
    warehouse.command("ALTER TABLE myelin.drift_events REMOVE TTL")
    asked = 0
    no_governance = governed_retention(GovernanceClient(nc, timeout_s=0.5))

    async def counting(r: retention.Retention, days: float) -> tuple[bool, list[str]]:
        nonlocal asked
        asked += 1
        return await no_governance(r, days)

    try:
        report = await apply_retention(
            js,
            sink,
            counting,
            (retention.rule("table:dead_letters"), retention.rule("table:drift_events")),
        )
        assert report.applied == {}
        assert all("governance did not answer" in r[0] for r in report.refused.values())
        assert len(report.refused) == 2 and asked == 1  # not asked again in the same round
        assert table_ttl(warehouse, "dead_letters") == 0
    finally:
        warehouse.command(
            "ALTER TABLE myelin.dead_letters MODIFY TTL toDateTime(ts) + INTERVAL 30 DAY"
        )
        warehouse.command(
            "ALTER TABLE myelin.drift_events MODIFY TTL toDateTime(ts) + INTERVAL 365 DAY"
        )


async def test_a_store_governance_did_not_answer_for_is_tried_again(
    nc: NATS, settings: Settings, sink: WarehouseSink, warehouse: Warehouse
) -> None:
    """A warehouse started while governance was down does not keep the old retention until
    its next restart: it asks again, and applies once governance allows."""
    js = bus.jetstream(nc, settings)
    rules = (retention.rule("table:drift_events"),)
    warehouse.command("ALTER TABLE myelin.drift_events REMOVE TTL")
    decide = governed_retention(GovernanceClient(nc, timeout_s=0.5))
    first = await apply_retention(js, sink, decide, rules)
    assert first.unsettled and table_ttl(warehouse, "drift_events") == 0
    reports: list[object] = []
    task = asyncio.create_task(
        keep_applying(js, sink, decide, first, reports.append, every_s=0.2, rules=rules)
    )
    gov = GovernanceApp(settings)
    await gov.start()  # governance comes up
    try:
        await asyncio.wait_for(task, timeout=15)  # returns once settled
        assert table_ttl(warehouse, "drift_events") == 365
        last = reports[-1]
        assert isinstance(last, RetentionReport) and not last.unsettled
        assert last.applied == {"table:drift_events": 365}
    finally:
        task.cancel()
        await gov.stop()
        warehouse.command(
            "ALTER TABLE myelin.drift_events MODIFY TTL toDateTime(ts) + INTERVAL 365 DAY"
        )
