"""Stopping background tasks reliably (every service and client uses this, not a bare
``task.cancel()``)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Any

log = logging.getLogger(__name__)


async def cancel_and_wait(task: asyncio.Task[Any], retry_s: float = 0.5) -> None:
    """Cancel ``task`` and return once it has ended.

    On Python 3.11 ``asyncio.wait_for`` returns the awaited result instead of raising when
    that result arrives in the same loop iteration as the cancellation (fixed in 3.12).
    nats-py's request is built on it, so a loop that makes NATS requests can miss one
    cancel and run on (seen here as a hung shutdown): the cancel is repeated until the
    task is done."""
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=retry_s)
    if not task.cancelled() and task.exception() is not None:
        log.warning("task %s had failed: %r", task.get_name(), task.exception())


async def cancel_all(tasks: Iterable[asyncio.Task[Any]], retry_s: float = 0.5) -> None:
    """``cancel_and_wait`` for each of ``tasks``, all at once."""
    await asyncio.gather(*(cancel_and_wait(t, retry_s) for t in tasks))
