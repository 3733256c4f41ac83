"""The command line: ``myelin models retrain`` runs a job here, ``myelin models retrains``
lists them."""

from __future__ import annotations

import json
import sys
from typing import TextIO

import msgspec
from nats.aio.client import Client as NATS

from myelin import bus
from myelin.retraining.jobs import JobStore, RetrainJob, Trigger
from myelin.retraining.retrainer import Retrainer
from myelin.settings import Settings
from myelin.trainers import load_trainer


async def retrain_command(
    settings: Settings,
    name: str,
    *,
    bound: int | None,
    force: bool,
    requester: str = "cli",
    out: TextIO | None = None,
) -> int:
    """``myelin models retrain NAME [--bound SEQ] [--force]``: run a retrain job here, with
    progress on stderr, and print its record (JSON) on stdout. Exit status 0 when the
    challenger is registered and in shadow (now or by the earlier job for this bound), 1
    when the job was denied shadow, failed or was turned away."""
    from myelin.stack.nats_connect import connect_once

    err = out or sys.stderr

    def say(msg: str) -> None:
        print(msg, file=err, flush=True)

    trainer = load_trainer(settings.trainer)  # a bad MYELIN_TRAINER fails before connecting
    nc = await connect_once(settings, "cli", hint="is 'myelin up' running? (MYELIN_NATS_URL)")
    try:
        retrainer = await Retrainer.connect(nc, settings, trainer=trainer, progress=say)
        outcome = await retrainer.run(
            Trigger("command", name, ref=requester, bound=bound), force=force
        )
    finally:
        await nc.close()
    job = outcome.job
    print(json.dumps(msgspec.to_builtins(job), sort_keys=True))
    if not outcome.ran and job.state in ("done", "denied"):
        say(f"job {job.job_id} already ran ({job.state}, v{job.version}); --force trains again")
    if job.state != "done":
        say(f"retrain {name}: {job.state}: {job.reason}")
        return 1
    return 0


async def list_jobs(nc: NATS, settings: Settings, model: str = "") -> list[RetrainJob]:
    """Every retrain job (of ``model``), oldest first (``myelin models retrains``)."""
    return await (await JobStore.open(bus.jetstream(nc, settings))).list(model)
