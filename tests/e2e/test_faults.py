"""The fault harness, short form: the whole platform under a steady load with seeded
faults (kill -9 of every service, SIGSTOP past ack waits, nats-server and redis-server
killed and restarted, one NATS outage longer than ingest's publish retry budget, the
warehouse down), then every acknowledged event classified and the final state compared
with an undisturbed run. And the control: without dedupe the checker must fail."""

from __future__ import annotations

from pathlib import Path

import pytest

from faults.harness import Report, format_report, run

pytestmark = pytest.mark.e2e


def assert_exact(report: Report, faults: int) -> None:
    """Every fault injected, every acknowledged event stored once, and the final state equal
    to the undisturbed run's."""
    print(format_report(report))
    c = report.faulted.classification
    assert c is not None and report.faulted.load is not None
    assert len(report.faulted.faults.entries) == faults
    assert not any("FAILED" in outcome for _, _, outcome in report.faulted.faults.entries)
    assert (c.lost, c.duplicated, c.missing_raw) == (0, 0, 0)
    assert c.stored_once == report.events
    assert report.diffs == []
    assert report.passed


@pytest.mark.timeout(900)
async def test_nothing_lost_nothing_doubled_state_equal_under_faults(tmp_path: Path) -> None:
    report = await run("short", seed=1, dedupe=True, workdir=tmp_path)
    assert_exact(report, faults=10)
    assert report.faulted.stored_twice > 0  # dedupe had work to do


@pytest.mark.timeout(600)
async def test_the_checker_fails_when_dedupe_is_off(tmp_path: Path) -> None:
    """The control: the same resends with the event-id guards off must count twice."""
    report = await run(
        "short", seed=2, dedupe=False, workdir=tmp_path, faults_on=False, events=20_000
    )
    print(format_report(report))
    c = report.faulted.classification
    assert c is not None
    assert c.duplicated > 0 and report.diffs
    assert not report.passed


@pytest.mark.timeout(900)
async def test_partition_owned_workers_under_kills_count_exactly(tmp_path: Path) -> None:
    """Three features workers share the partitions by leases. One is killed with SIGKILL and,
    while its partitions move, a second; one is paused past its lease (another takes its
    partitions, and it must find out and stop); the first one is killed; NATS restarts.
    Every event is applied exactly once: the final Redis vectors and ClickHouse aggregates
    equal an undisturbed run's."""
    report = await run("workers", seed=3, dedupe=True, workdir=tmp_path)
    assert_exact(report, faults=4)
    held = [p for parts, _moves in report.faulted.partitions.values() for p in parts]
    assert sorted(held) == list(range(8))  # every partition held by exactly one worker
    assert all(parts for parts, _ in report.faulted.partitions.values())  # by all three
