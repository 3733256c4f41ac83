"""Stopping background tasks: a task that misses a cancel (as ``asyncio.wait_for`` makes
it on Python 3.11 when the awaited result arrives with the cancel) still ends."""

from __future__ import annotations

import asyncio

from myelin.tasks import cancel_all, cancel_and_wait


async def _swallows_first_cancel(ticks: list[int]) -> None:
    """A loop like the lease and progress loops: it catches what a lost cancel turns into
    and goes on."""
    swallowed = False
    while True:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            if swallowed:
                raise
            swallowed = True  # the first cancel is lost, as inside wait_for on 3.11
        ticks.append(1)


async def test_a_task_that_misses_one_cancel_is_cancelled_again_until_it_ends() -> None:
    ticks: list[int] = []
    task = asyncio.create_task(_swallows_first_cancel(ticks))
    await asyncio.sleep(0)
    await asyncio.wait_for(cancel_and_wait(task, retry_s=0.01), timeout=5)
    assert task.cancelled()
    assert ticks == [1]  # it did go on once: one cancel alone would have hung the stop


async def test_a_plain_cancel_would_have_left_it_running() -> None:
    ticks: list[int] = []
    task = asyncio.create_task(_swallows_first_cancel(ticks))
    await asyncio.sleep(0)
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=0.05)
    assert not done  # the stand-in really misses a cancel
    await cancel_and_wait(task, retry_s=0.01)
    assert task.cancelled()


async def test_cancel_all_ends_every_task_and_a_failed_one_does_not_raise() -> None:
    async def fails() -> None:
        raise ValueError("boom")

    failed = asyncio.create_task(fails())
    await asyncio.sleep(0)
    stubborn = asyncio.create_task(_swallows_first_cancel([]))
    await asyncio.sleep(0)
    await cancel_all([failed, stubborn], retry_s=0.01)
    assert stubborn.cancelled()
    assert isinstance(failed.exception(), ValueError)
