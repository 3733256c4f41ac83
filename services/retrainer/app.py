"""retrainer composition root: the trainer, the retrainer (registry, training data over
NATS, the job store, the audit log), the DRIFT consumer and the optional schedule."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from nats.aio.client import Client as NATS
from nats.js.errors import NotFoundError

from myelin import bus, topology
from myelin.consume import PullLoop, ensure_consumer
from myelin.dead_letters import consumer_dead_letters
from myelin.models import ModelRegistry
from myelin.retraining import Retrainer
from myelin.settings import Settings
from myelin.subjects import DRIFT_STREAM
from myelin.tasks import cancel_all
from myelin.trainers import load_trainer
from services.retrainer.drift_api import drift_handler
from services.retrainer.schedule import run_schedule

log = logging.getLogger(__name__)
DRIFT_DURABLE = topology.RETRAINER_DURABLE
# The batch's deadline is pushed back every third of this while a job runs (in_progress),
# so a job may take as long as it needs; a process that died is redelivered after it.
ACK_WAIT_S = topology.RETRAINER_ACK_WAIT_S
STOP_GRACE_S = 10.0  # a running job gets this long to finish at stop, then is interrupted


class RetrainerApp:
    name = "retrainer"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._nc: NATS | None = None
        self.retrainer: Retrainer | None = None
        self.loop: PullLoop | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = asyncio.Event()

    async def start(self) -> None:
        try:
            await self._start()
        except BaseException:
            await self.stop()  # a failed start leaves nothing behind
            raise

    async def _start(self) -> None:
        s = self.settings
        trainer = load_trainer(s.trainer)  # a bad MYELIN_TRAINER stops the start, named
        log.info("trainer %s (source sha256 %s)", trainer.spec, trainer.source_sha256[:12])
        self._nc = await bus.connect(s, self.name)
        js = bus.jetstream(self._nc, s)
        self.retrainer = await Retrainer.connect(self._nc, s, trainer=trainer, progress=log.info)
        # Resume right after the last acked batch: the records a killed predecessor was
        # working on come again now, not after the ack wait (their job is taken over).
        try:
            info = await js.consumer_info(DRIFT_STREAM, DRIFT_DURABLE)
            start: int | None = (info.ack_floor.stream_seq if info.ack_floor else 0) + 1
        except NotFoundError:
            start = None
        d = topology.durable(DRIFT_DURABLE, s)
        await ensure_consumer(
            js,
            d.stream,
            d.name,
            d.filter_subject,
            max_ack_pending=d.max_ack_pending,
            ack_wait_s=d.ack_wait_s,
            start_seq=start,
        )
        self.loop = PullLoop(
            js,
            DRIFT_STREAM,
            DRIFT_DURABLE,
            drift_handler(self.retrainer, ACK_WAIT_S),
            batch=16,
            max_backoff_s=60.0,  # a transient failure re-runs a whole job: not too often
            dead_letter=consumer_dead_letters(bus.Publisher(js, s), DRIFT_DURABLE),
        )
        self._tasks.append(asyncio.create_task(self.loop.run(), name=DRIFT_DURABLE))
        if s.retrain_every_s > 0:
            registry = ModelRegistry(self._nc, js)
            self._tasks.append(
                asyncio.create_task(
                    run_schedule(self.retrainer, registry, s.retrain_every_s, self._stopping),
                    name="retrain-schedule",
                )
            )

    async def stop(self) -> None:
        self._stopping.set()
        if self.loop is not None:
            self.loop.stop()
        if self._tasks:
            _, pending = await asyncio.wait(self._tasks, timeout=STOP_GRACE_S)
            # a job still training: interrupted, taken over later
            await cancel_all(pending)
            await asyncio.gather(*self._tasks, return_exceptions=True)
            self._tasks.clear()
        if self._nc is not None:
            with contextlib.suppress(Exception):
                await self._nc.drain()
            self._nc = None

    def status(self) -> dict[str, Any]:
        loop, r = self.loop, self.retrainer
        drift = loop.snapshot() if loop else {}
        return {
            # ready: drift records flow (none stuck retrying past the alert threshold)
            "ready": loop is not None and loop.healthy,
            "not_ready": [f"{DRIFT_DURABLE}: {drift.get('error', '')}"]
            if loop is not None and not loop.healthy
            else [],
            "position": loop.position if loop else 0,
            "drift": drift,
            "trainer": r.trainer.spec if r else "",
            "job": r.current if r else "",
            "jobs": dict(r.counts) if r else {},
            "schedule_s": self.settings.retrain_every_s,
        }
