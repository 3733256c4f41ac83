"""Triggers and jobs: what asks for a retrain, the job it starts and where jobs live.

Jobs are idempotent. A job's id comes from its trigger: a drift of version *v* of a
model is one job however many windows report it (``<model>.drift.v<v>``); a command or
schedule is one job per bound (``<model>.seq.<bound>``). Jobs live in NATS KV
(``myelin_retrains``); a trigger claims its job by creating the key, so of two triggers
only one trains, and the other gets the existing job. A running job refreshes its key
(heartbeat); one silent for ``MYELIN_RETRAIN_STALE_S`` (its process died) is taken over
by the next trigger. A failed job runs again on a trigger after ``MYELIN_RETRAIN_RETRY_S``
(at once when it failed for a transient cause), a finished one only when forced.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any, Literal

import msgspec
from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError

from myelin import bus
from myelin.records import DriftDetected
from myelin.retraining.errors import JobTakenOver, RetrainError
from myelin.subjects import RETRAINS_BUCKET

TriggerKind = Literal["drift", "command", "schedule"]
JobStateName = Literal["running", "done", "failed", "denied", "skipped"]


@dataclass(frozen=True)
class Trigger:
    """Why a retrain is asked for. ``bound``: an EVENTS stream sequence (None: the
    stream's last when the job starts); ``drifted_version``: the version that drifted."""

    kind: TriggerKind
    model: str
    ref: str = ""  # the drift id, or who asked
    drifted_version: int = 0
    bound: int | None = None


def drift_trigger(record: DriftDetected) -> Trigger:
    version = record.model_version.strip().lstrip("v")
    if not version.isdigit():
        raise RetrainError(
            f"drift record {record.drift_id!r} names version {record.model_version!r}, "
            "not a version number"
        )
    return Trigger("drift", record.model, ref=record.drift_id, drifted_version=int(version))


def job_id(trigger: Trigger, bound: int | None) -> str:
    """A drift of one version is one job, whatever the window; a command or schedule is
    one job per (model, bound). Also the job's key in KV (``[-_.a-z0-9]``)."""
    if trigger.kind == "drift":
        return f"{trigger.model}.drift.v{trigger.drifted_version}"
    if bound is None:
        raise RetrainError(f"a {trigger.kind} job needs its bound")
    return f"{trigger.model}.seq.{bound}"


class RetrainJob(msgspec.Struct, frozen=True, kw_only=True):
    """A job's record (KV ``myelin_retrains``, key = its id)."""

    job_id: str
    model: str
    state: JobStateName
    trigger: str  # drift | command | schedule
    trigger_ref: str = ""
    attempt: int = 1
    owner: str = ""  # host:pid of the process running it
    started_ms: int = 0
    heartbeat_ms: int = 0
    finished_ms: int = 0
    bound: int = 0  # EVENTS stream sequence the training set is bounded by
    champion: int = 0  # the parent version
    version: int = 0  # the challenger it registered
    fingerprint: str = ""
    rows: int = 0
    metrics: dict[str, float] = {}
    reason: str = ""  # why it failed, was denied or skipped
    transient: bool = False  # failed for a cause that may pass (run again on the next trigger)


def reclaimable(
    job: RetrainJob, now_ms: int, *, stale_ms: float, retry_ms: float, force: bool
) -> bool:
    """Whether a trigger may take an existing job over (and run it again)."""
    if job.state == "running":
        return now_ms - job.heartbeat_ms > stale_ms  # its process died
    if job.state == "failed":
        return force or job.transient or now_ms - job.finished_ms >= retry_ms
    return force  # done, denied: the same trigger does not train twice


_job_dec = msgspec.json.Decoder(RetrainJob)
_json = msgspec.json.Encoder()


def _now_ms() -> int:
    return int(time.time() * 1000)


class JobStore:
    """Jobs in NATS KV: claimed by ``create`` (atomic), then updated compare-and-set on
    the revision the claimer holds, so a process that lost its job cannot overwrite it.
    Every write by the owner refreshes the job's heartbeat."""

    def __init__(self, kv: Any, js: JetStreamContext) -> None:
        self._kv = kv
        self._js = js
        self._revisions: dict[str, int] = {}
        self._latest: dict[str, RetrainJob] = {}  # what this process last wrote, per job
        self._lock = asyncio.Lock()  # one write at a time: each needs the previous revision

    @classmethod
    async def open(cls, js: JetStreamContext) -> JobStore:
        return cls(await bus.kv_bucket(js, RETRAINS_BUCKET, history=8), js)

    async def get(self, jid: str) -> RetrainJob | None:
        try:
            entry = await self._kv.get(jid)
        except KeyNotFoundError:
            return None
        return _job_dec.decode(entry.value) if entry.value else None

    async def claim(
        self, job: RetrainJob, *, stale_ms: float, retry_ms: float, force: bool
    ) -> tuple[RetrainJob, bool]:
        """``(job, True)`` when this caller owns it now; ``(existing, False)`` otherwise."""
        for _ in range(10):
            try:
                revision = await self._kv.create(job.job_id, _json.encode(job))
                self._owned(job, revision)
                return job, True
            except KeyWrongLastSequenceError:
                pass
            try:
                entry = await self._kv.get(job.job_id)
            except KeyNotFoundError:
                continue  # deleted in between: try to create it again
            existing = _job_dec.decode(entry.value)
            if not reclaimable(
                existing, _now_ms(), stale_ms=stale_ms, retry_ms=retry_ms, force=force
            ):
                return existing, False
            # a job whose process died resumes at its bound: the same rows, and the version
            # it may have registered already is found by its fingerprint
            bound = job.bound or (existing.bound if existing.state == "running" else 0)
            taken = msgspec.structs.replace(job, attempt=existing.attempt + 1, bound=bound)
            try:
                revision = await self._kv.update(
                    job.job_id, _json.encode(taken), last=entry.revision
                )
            except KeyWrongLastSequenceError:
                continue  # another trigger took it first: look again
            self._owned(taken, revision)
            return taken, True
        raise RetrainError(f"could not claim job {job.job_id}: too much contention")

    def _owned(self, job: RetrainJob, revision: int) -> None:
        self._revisions[job.job_id] = revision
        self._latest[job.job_id] = job

    async def put(self, job: RetrainJob) -> RetrainJob:
        """Write the claimed job (its heartbeat refreshed); :class:`JobTakenOver` if
        another process took it over."""
        async with self._lock:
            return await self._write(msgspec.structs.replace(job, heartbeat_ms=_now_ms()))

    async def touch(self, jid: str) -> None:
        """The heartbeat of a running job: its last written record, refreshed."""
        async with self._lock:
            await self._write(msgspec.structs.replace(self._latest[jid], heartbeat_ms=_now_ms()))

    async def _write(self, job: RetrainJob) -> RetrainJob:
        try:
            revision = await self._kv.update(
                job.job_id, _json.encode(job), last=self._revisions.get(job.job_id, 0)
            )
        except KeyWrongLastSequenceError:
            raise JobTakenOver(
                f"job {job.job_id} was taken over by another process (this one looked dead "
                "to it: its heartbeat stopped for MYELIN_RETRAIN_STALE_S); this run stops"
            ) from None
        self._owned(job, revision)
        return job

    async def list(self, model: str = "") -> list[RetrainJob]:
        jobs = []
        for k in await bus.kv_keys(self._js, RETRAINS_BUCKET):
            if model and not k.startswith(f"{model}."):
                continue
            found = await self.get(k)
            if found is not None:
                jobs.append(found)
        return sorted(jobs, key=lambda j: j.started_ms)
