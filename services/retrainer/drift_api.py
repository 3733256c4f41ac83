"""Inbound adapter: ``DriftDetected`` records from the DRIFT stream (a durable pull
consumer) start retrain jobs.

A batch is acked once its jobs are finished (done, denied, or failed for good): a
process killed mid-job leaves the records unacked, and the next process takes the job
over. While a job runs, the batch's ack deadline is pushed back (``in_progress``). A job
that failed for a transient cause (the warehouse unreachable, the bound not stored in
time) makes the batch transient-failed: the loop retries it with backoff. Records that do
not decode, or name no version number, are dead-lettered.
"""

from __future__ import annotations

import asyncio
import contextlib

import msgspec
from nats.aio.msg import Msg

from myelin.consume import BatchHandler, PoisonMessages
from myelin.errors import BAD_INPUT, Retryable
from myelin.records import DriftDetected
from myelin.retraining import Retrainer, RetrainError, drift_trigger
from myelin.tasks import cancel_and_wait
from services.retrainer.logic import drift_triggers

_dec = msgspec.msgpack.Decoder(DriftDetected)
_REFUSED: tuple[type[Exception], ...] = (*BAD_INPUT, RetrainError)


async def _keep_alive(msgs: list[Msg], every_s: float) -> None:
    while True:
        await asyncio.sleep(every_s)
        for m in msgs:
            with contextlib.suppress(Exception):  # a lost one only risks a redelivery
                await m.in_progress()


def drift_handler(retrainer: Retrainer, ack_wait_s: float) -> BatchHandler:
    async def handle(msgs: list[Msg]) -> None:
        records: list[DriftDetected] = []
        bad: list[Msg] = []
        for m in msgs:
            try:
                record = _dec.decode(m.data)
                drift_trigger(record)  # names a version number
            except _REFUSED:
                bad.append(m)
                continue
            records.append(record)
        if bad:
            raise PoisonMessages(
                f"{len(bad)} message(s) on the DRIFT stream are not DriftDetected records "
                "with a version number",
                bad,
            )
        alive = asyncio.create_task(_keep_alive(msgs, ack_wait_s / 3))
        try:
            for trigger in drift_triggers(records):
                outcome = await retrainer.run(trigger)
                job = outcome.job
                if outcome.ran and job.state == "failed" and job.transient:
                    raise Retryable(
                        f"retrain job {job.job_id} failed for a cause that may pass: {job.reason}"
                    )
        finally:
            await cancel_and_wait(alive)

    return handle
