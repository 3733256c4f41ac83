"""Inbound adapter: a retrain of every champion each ``MYELIN_RETRAIN_EVERY_S`` seconds
(off by default). A tick with no new events asks for the bound of the last one: the same
job, which does not train again."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from myelin.models import ModelRegistry
from myelin.retraining import Retrainer, Trigger
from services.retrainer.logic import due

log = logging.getLogger(__name__)


async def run_schedule(
    retrainer: Retrainer, registry: ModelRegistry, every_s: float, stop: asyncio.Event
) -> None:
    """Until ``stop`` is set (a job in progress is finished first)."""
    last = time.monotonic()
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), max(0.0, every_s - (time.monotonic() - last)))
        if stop.is_set() or not due(last, time.monotonic(), every_s):
            continue
        last = time.monotonic()
        for model in await registry.aliased_models():
            if stop.is_set():
                break
            try:
                await retrainer.run(Trigger("schedule", model, ref="schedule"))
            except Exception:
                log.exception("scheduled retrain of %s failed", model)
