"""Governance's audit trail, written behind the decision, on a real nats-server: every
record is stored; while the AUDIT stream is gone, decisions are withheld once the trail
lags, and nothing written before is lost when it comes back."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace

import pytest
from nats.aio.client import Client as NATS

from myelin import bus
from myelin.audit import WITHHELD, AuditTrail, platform_record
from myelin.errors import Retryable
from myelin.records import AuditRecord
from myelin.settings import Settings
from myelin.subjects import AUDIT_STREAM
from tests.helpers import audit_records

pytestmark = pytest.mark.integration


def record(i: int) -> AuditRecord:
    return platform_record("trail_test", f"subject-{i}", [f"reason {i}"], {"i": i}, allow=True)


async def test_every_record_written_behind_is_stored_once(nc: NATS, settings: Settings) -> None:
    trail = AuditTrail(nc, settings)
    await trail.start()
    written = [record(i) for i in range(200)]
    for r in written:
        await trail(r)  # returns before the acknowledgement
    assert await trail.flush(10.0)
    await trail.close()
    stored = await audit_records(settings, "trail_test")
    assert sorted(r.decision_id for r in stored) == sorted(r.decision_id for r in written)
    assert trail.stored == 200 and trail.unconfirmed == 0 and trail.withheld == 0


async def test_a_gone_stream_withholds_decisions_and_loses_nothing(
    nc: NATS, settings: Settings
) -> None:
    fast = replace(settings, publish_timeout_s=0.5, publish_retries=0)
    js = bus.jetstream(nc, fast)
    trail = AuditTrail(nc, fast, max_lag_s=0.3)
    await trail.start()
    await js.delete_stream(AUDIT_STREAM)  # the trail is down
    before = [record(i) for i in range(5)]
    for r in before:
        await trail(r)  # written while nothing has lagged yet
    await asyncio.sleep(0.5)
    with pytest.raises(Retryable) as refused:
        await trail(record(99))
    assert refused.value.message == WITHHELD
    assert "5 record(s) unconfirmed" in str(refused.value.details["cause"])
    assert trail.withheld == 1 and trail.snapshot()["audit_lag_s"] > 0.3

    await bus.provision(js, fast)  # the stream is back: the records are published again
    assert await trail.flush(15.0), trail.last_error
    await trail(record(100))  # and decisions are given again
    assert await trail.flush(5.0)
    await trail.close()
    stored = {r.subject for r in await audit_records(settings, "trail_test")}
    assert stored == {f"subject-{i}" for i in (0, 1, 2, 3, 4, 100)}  # 99 was withheld
    assert trail.republished == 5


async def test_what_was_done_already_is_recorded_even_while_decisions_are_withheld(
    nc: NATS, settings: Settings
) -> None:
    fast = replace(settings, publish_timeout_s=0.5, publish_retries=0)
    js = bus.jetstream(nc, fast)
    trail = AuditTrail(nc, fast, max_lag_s=0.3, max_unconfirmed=2)
    await trail.start()
    await js.delete_stream(AUDIT_STREAM)
    await trail(record(1))
    await trail(record(2))
    assert trail.lagging()  # two in flight: the limit
    with pytest.raises(Retryable):
        await trail(record(3))  # a decision not yet given: withheld
    await trail.after_the_fact(record(4))  # a rollback done already: recorded all the same
    await bus.provision(js, fast)
    assert await trail.flush(15.0), trail.last_error
    await trail.close()
    stored = {r.subject for r in await audit_records(settings, "trail_test")}
    assert stored == {"subject-1", "subject-2", "subject-4"}


async def test_a_flush_returns_once_what_came_before_is_stored_while_more_comes(
    nc: NATS, settings: Settings
) -> None:
    trail = AuditTrail(nc, settings)
    await trail.start()
    for i in range(50):
        await trail(record(i))
    flushed = asyncio.ensure_future(trail.flush(10.0))
    for i in range(50, 100):
        await trail(record(i))  # written after the flush began
    assert await flushed
    await trail.close()
    assert trail.stored == 100


async def test_records_that_cannot_be_stored_by_shutdown_are_logged(
    nc: NATS, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    fast = replace(settings, publish_timeout_s=0.3, publish_retries=0)
    js = bus.jetstream(nc, fast)
    trail = AuditTrail(nc, fast)
    await trail.start()
    await js.delete_stream(AUDIT_STREAM)
    await trail(record(7))
    with caplog.at_level(logging.ERROR, logger="myelin.audit"):
        await trail.close(timeout_s=0.5)
        with pytest.raises(Retryable):
            await trail(record(8))  # a decision after shutdown: withheld
        await trail.after_the_fact(record(9))  # done already: to the log
    lines = [r.getMessage() for r in caplog.records if "not stored" in r.getMessage()]
    assert len(lines) == 2, lines
    assert '"subject":"subject-7"' in lines[0] and '"reasons":["reason 7"]' in lines[0]
    assert '"subject":"subject-9"' in lines[1] and "stopping" in lines[1]
    assert trail.logged_only == 2
    await bus.provision(js, fast)
