"""Partition leases on a real nats-server: workers settle on a fair share, a worker that
stops renewing (killed) loses its partitions to the others after the lease time, a new
worker receives its share, and a paused holder finds out it lost its leases."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from nats.aio.client import Client as NATS

from myelin import bus
from myelin.settings import Settings
from services.features.leases import PartitionLeases

pytestmark = pytest.mark.integration
PARTS = 8
LEASE_S = 1.5


class Worker:
    def __init__(self, nc: NATS, settings: Settings, name: str) -> None:
        self.running: set[int] = set()
        self.gains = 0
        self.leases = PartitionLeases(
            bus.jetstream(nc, settings), name, PARTS, LEASE_S, self._gain, self._lose
        )
        self.task: asyncio.Task[None] | None = None

    async def _gain(self, p: int) -> None:
        self.gains += 1
        self.running.add(p)

    async def _lose(self, p: int) -> None:
        self.running.discard(p)

    async def start(self) -> None:
        await self.leases.open()
        self.task = asyncio.create_task(self.leases.run())

    async def kill(self) -> None:
        """As SIGKILL: no more renewals, nothing given back."""
        assert self.task is not None
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


@pytest.fixture
async def workers(
    nc: NATS, settings: Settings
) -> AsyncIterator[Callable[[str], Awaitable[Worker]]]:
    started: list[Worker] = []

    async def start(name: str) -> Worker:
        w = Worker(nc, settings, name)
        await w.start()
        started.append(w)
        return w

    yield start
    for w in started:
        await w.kill()


async def settled(ws: list[Worker], timeout_s: float = 15.0) -> None:
    """Until the live workers run every partition exactly once, shares within one."""
    deadline = time.monotonic() + timeout_s
    while True:
        held = sorted(p for w in ws for p in w.running)
        sizes = [len(w.running) for w in ws]
        if held == list(range(PARTS)) and max(sizes) - min(sizes) <= 1:
            return
        assert time.monotonic() < deadline, f"not settled: {[sorted(w.running) for w in ws]}"
        await asyncio.sleep(0.05)


async def test_workers_share_move_and_rebalance(
    workers: Callable[[str], Awaitable[Worker]],
) -> None:
    a = await workers("a")
    await settled([a])
    b = await workers("b")
    await settled([a, b])  # a gave half back, b took it
    c = await workers("c")
    await settled([a, b, c])

    t0 = time.monotonic()
    await c.kill()  # its leases and member key expire: a and b take its partitions
    await settled([a, b])
    moved_in = time.monotonic() - t0
    assert moved_in < LEASE_S + 3 * LEASE_S / 3 + 2.0, moved_in  # the lease, a tick or so

    c2 = await workers("c")  # the same name again: a restarted worker
    await settled([a, b, c2])


async def test_a_paused_holder_finds_its_leases_taken(
    workers: Callable[[str], Awaitable[Worker]],
) -> None:
    a = await workers("a")
    await settled([a])
    await a.kill()  # as SIGSTOP: it still thinks it holds everything
    assert a.running == set(range(PARTS))
    b = await workers("b")
    await settled([b])  # after the lease time, b holds every partition
    await a.leases.tick()  # a wakes up: its renewals are refused, it stops its partitions
    assert a.running == set() and a.leases.owned == []
