"""Retraining that is triggered, reproducible and governed.

A trigger (a ``DriftDetected`` record, a schedule, or ``myelin models retrain``) starts a
*job* that:

1. takes the model's champion as the parent: its feature view, features and how its
   labels were built (``labels["training_labels"]``, a builder of :mod:`myelin.training`);
2. fixes a **bound**, a sequence of the EVENTS stream (the stream's last one when the
   trigger gives none), waits until the features service has applied everything up to it
   and the warehouse has stored it, and builds the point-in-time training set bounded by
   it: the same bound gives the same rows whenever it is run, also after more events
   arrived; their SHA-256 (:func:`fingerprint`) is recorded;
3. trains with the configured trainer (``MYELIN_TRAINER``, :mod:`myelin.trainers`) on the
   older rows and holds the newest out (``MYELIN_RETRAIN_HOLDOUT_SHARE``);
4. scores the challenger's ONNX model *and the champion's*, with onnxruntime, on exactly
   those holdout rows: ``auc`` / ``logloss`` beside ``champion_auc`` / ``champion_logloss``;
5. registers the challenger with its lineage: provenance (training window, view version,
   features, rows, the bounded query, ``created_by = "retrain <job>"``, the champion's
   label source), labels (``origin=retrain``, job, trigger, bound, fingerprint, labels
   builder, trainer and the code that ran: package version, git commit, SHA-256 of the
   trainer's and of the training-set code) and a drift reference of its training rows;
6. asks governance to put it in **shadow**. A refusal is the job's outcome (``denied``),
   not an error. Canary and champion are later steps (:func:`advance`), each a governance
   decision (the promote policy wants a retrained version to go shadow -> canary ->
   champion, and no worse than the champion on the holdout).

Jobs are idempotent. A job's id comes from its trigger: a drift of version *v* of a
model is one job however many windows report it (``<model>.drift.v<v>``); a command or
schedule is one job per bound (``<model>.seq.<bound>``). Jobs live in NATS KV
(``myelin_retrains``); a trigger claims its job by creating the key, so of two triggers
only one trains, and the other gets the existing job. A running job refreshes its key
(heartbeat); one silent for ``MYELIN_RETRAIN_STALE_S`` (its process died) is taken over
by the next trigger. A failed job runs again on a trigger after ``MYELIN_RETRAIN_RETRY_S``
(at once when it failed for a transient cause), a finished one only when forced. Every
start, finish and turned-away trigger is an audit record (actions ``retrain_start``,
``retrain_finish``, ``retrain_skip``); governance audits its own decisions.

Errors (all :class:`RetrainError`)::

    RetrainError
     +-- NotRetrainable   the champion lacks what a retrain needs (view, features, labels)
     +-- TooFewRows       the bounded training set is too small or has one class
     +-- BoundNotStored   the features service / warehouse did not reach the bound in time
     +-- JobTakenOver     another process took the job over (it looked dead)
    TrainerError (myelin.trainers): MYELIN_TRAINER cannot be loaded, or it failed
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Literal, Protocol, TextIO

import msgspec
import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError

from myelin import bus, sql_client
from myelin.audit import AuditLog, platform_record
from myelin.consume import is_transient
from myelin.drift import Reference, build_reference
from myelin.errors import MyelinError, Retryable
from myelin.models import (
    ModelRegistry,
    ModelVersion,
    PromotionDenied,
    Provenance,
    check_name,
)
from myelin.records import AuditRecord, DriftDetected
from myelin.settings import Settings
from myelin.subjects import (
    EVENTS_STREAM,
    FEATURES_STREAM,
    LATE_STREAM,
    RETRAINS_BUCKET,
    RPC_FEATURES_VIEWS,
    health_subject,
)
from myelin.trainers import (
    Fitted,
    LoadedTrainer,
    Split,
    TrainerError,
    load_trainer,
    matrix,
    time_split,
)
from myelin.training import labels_sql, training_set_sql

log = logging.getLogger(__name__)

TRAINING_LABELS = "training_labels"  # the champion's label naming its labels builder
FINGERPRINT_FORMAT = "myelin-training-set/1"


class RetrainError(MyelinError):
    code = "retrain_error"


class NotRetrainable(RetrainError):
    code = "not_retrainable"


class TooFewRows(RetrainError):
    code = "too_few_rows"


class BoundNotStored(RetrainError, Retryable):
    code = "bound_not_stored"


class JobTakenOver(RetrainError):
    code = "job_taken_over"


# ---------------------------------------------------------------- triggers and jobs

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


# ---------------------------------------------------------------- reproducibility


def fingerprint(table: pa.Table, features: list[str]) -> str:
    """SHA-256 of a training set in a canonical form (``myelin-training-set/1``): the
    column names, the row count, then per column its null mask and its values as
    little-endian fixed-width numbers (times as int64 microseconds since the epoch,
    labels as int64, features as float64 with one NaN) or, for the entity ids, int64
    UTF-8 lengths then the bytes. Independent of the Arrow types and chunking ClickHouse
    (embedded or server) returns: the same rows give the same fingerprint."""
    cols = ["entity_id", "ts", "label", "features_as_of", *features]
    h = hashlib.sha256(FINGERPRINT_FORMAT.encode())
    h.update(json.dumps(cols).encode())
    h.update(np.int64(table.num_rows).astype("<i8").tobytes())
    for name in cols:
        col = table.column(name).combine_chunks()
        nulls = pc.is_null(col).to_numpy(zero_copy_only=False).astype(np.uint8)
        h.update(nulls.tobytes())
        if name == "entity_id":
            values = [v or "" for v in col.cast(pa.string()).to_pylist()]
            encoded = [v.encode() for v in values]
            h.update(np.fromiter(map(len, encoded), np.int64, len(encoded)).astype("<i8").tobytes())
            h.update(b"".join(encoded))
        elif name in ("ts", "features_as_of"):
            us = col.cast(pa.timestamp("us", tz="UTC"), safe=False).cast(pa.int64()).fill_null(0)
            h.update(us.to_numpy(zero_copy_only=False).astype("<i8").tobytes())
        elif name == "label":
            labels = col.cast(pa.int64()).fill_null(0).to_numpy(zero_copy_only=False)
            h.update(labels.astype("<i8").tobytes())
        else:
            v = col.cast(pa.float64()).fill_null(0.0).to_numpy(zero_copy_only=False)
            v = np.where(np.isnan(v), np.float64("nan"), v).astype("<f8")
            h.update(v.tobytes())
    return h.hexdigest()


def _git_commit(root: Path) -> str:
    """The commit checked out in ``root`` (the source tree this package runs from; '' when
    it is not a git checkout). Read from the files (HEAD, refs, packed-refs): no git
    process is run."""
    dot = root / ".git"
    if dot.is_file():  # a worktree: "gitdir: <path>"
        text = dot.read_text().strip()
        if not text.startswith("gitdir:"):
            return ""
        dot = (root / text.split(":", 1)[1].strip()).resolve()
    if not (dot / "HEAD").is_file():
        return ""
    head = (dot / "HEAD").read_text().strip()
    if not head.startswith("ref:"):
        return head  # detached
    ref = head.split(":", 1)[1].strip()
    common = dot
    if (dot / "commondir").is_file():
        common = (dot / (dot / "commondir").read_text().strip()).resolve()
    for base in (dot, common):
        if (base / ref).is_file():
            return (base / ref).read_text().strip()
    packed = common / "packed-refs"
    if packed.is_file():
        for line in packed.read_text().splitlines():
            sha, _, name = line.partition(" ")
            if name == ref:
                return sha
    return ""


def code_version() -> dict[str, str]:
    """What code builds a training set and registers a version: the package version, the
    git commit (when run from a checkout) and the SHA-256 of the training-set and
    retraining modules' source (the commit alone misses uncommitted changes)."""
    try:
        version = metadata.version("myelin")
    except metadata.PackageNotFoundError:
        version = "unknown"
    here = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for name in ("training.py", "retraining.py"):
        h.update((here / name).read_bytes())
    return {
        "myelin_version": version,
        "git_commit": _git_commit(here.parent),
        "training_code_sha256": h.hexdigest(),
    }


# ---------------------------------------------------------------- evaluation


def score_onnx(onnx: bytes, x: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
    """P(label = 1) per row, as the inference service reads a model: the output named
    probabilities (or output_probability, probability), else the last; its column 1 when
    it has two or more."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(onnx, sess_options=opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    pick = next(
        (n for n in names if n in ("probabilities", "output_probability", "probability")),
        names[-1],
    )
    (out,) = sess.run([pick], {sess.get_inputs()[0].name: x})
    p = np.asarray(out, dtype=np.float64)
    if p.ndim == 2 and p.shape[1] >= 2:
        return p[:, 1]
    return p.reshape(-1)


def holdout_metrics(y: npt.NDArray[np.int64], p: npt.NDArray[np.float64]) -> tuple[float, float]:
    """(AUC, log loss) of scores ``p`` against labels ``y`` (scikit-learn's definitions)."""
    from sklearn.metrics import log_loss, roc_auc_score

    return float(roc_auc_score(y, p)), float(log_loss(y, p, labels=[0, 1]))


@dataclass(frozen=True)
class Evaluation:
    metrics: dict[str, float]
    reference: Reference


def evaluate(
    table: pa.Table,
    features: list[str],
    split: Split,
    challenger: bytes,
    champion: bytes,
    champion_features: list[str],
) -> Evaluation:
    """The challenger and the champion on the same holdout rows; the challenger's drift
    reference from its training rows and its scores on them."""
    holdout = split.holdout(table)
    x, y = matrix(holdout, features)
    if len(np.unique(y)) < 2:
        raise TooFewRows(
            f"the {len(y)} holdout rows all have label {int(y[0]) if len(y) else '-'}: no AUC "
            "can be measured; retrain with a later bound or a larger MYELIN_RETRAIN_HOLDOUT_SHARE"
        )
    auc, logloss = holdout_metrics(y, score_onnx(challenger, x))
    xc, _ = matrix(holdout, champion_features)
    champion_auc, champion_logloss = holdout_metrics(y, score_onnx(champion, xc))
    x_train, y_train = matrix(split.train(table), features)
    reference = build_reference(features, x_train, score_onnx(challenger, x_train))
    y_all = table.column("label").to_numpy(zero_copy_only=False).astype(np.int64)
    return Evaluation(
        metrics={
            "auc": auc,
            "logloss": logloss,
            "champion_auc": champion_auc,
            "champion_logloss": champion_logloss,
            "positive_rate": float(np.mean(y_all)),
            "training_rows": float(len(y_train)),
            "holdout_rows": float(len(y)),
        },
        reference=reference,
    )


# ---------------------------------------------------------------- where the data comes from


class TrainingData(Protocol):
    """What a job reads: the EVENTS stream's position, which feature view version to read,
    when the warehouse holds everything up to a bound, and SQL."""

    async def last_seq(self) -> int: ...

    async def feature_version(self, view: str, features: list[str], pinned: str) -> str: ...

    async def wait_stored(
        self, bound: int, view: str, version: str, say: Callable[[str], None]
    ) -> None: ...

    async def query(self, sql: str) -> pa.Table: ...


class NatsTrainingData:
    """The running platform: JetStream for positions, the features service for view
    versions and how far each has applied EVENTS, the warehouse service for SQL."""

    def __init__(self, nc: NATS, js: JetStreamContext, timeout_s: float) -> None:
        self._nc = nc
        self._js = js
        self._timeout = timeout_s

    async def last_seq(self) -> int:
        return int((await self._js.stream_info(EVENTS_STREAM)).state.last_seq)

    async def _versions(self) -> list[dict[str, Any]]:
        raw = await bus.request(self._nc, RPC_FEATURES_VIEWS, {"op": "list"}, timeout=30)
        versions: list[dict[str, Any]] = msgspec.json.decode(raw)["versions"]
        return versions

    async def feature_version(self, view: str, features: list[str], pinned: str) -> str:
        """The version the champion was trained on and is served from (inference reads a
        model's pinned version) while it runs: challenger and champion are then compared
        on the features each is served with. Once it no longer runs, the served version,
        if it computes every feature the model reads."""
        versions = [v for v in await self._versions() if v["view"] == view]
        if any(v["version"] == pinned for v in versions):
            return pinned
        for v in versions:
            if v["served"] and set(features) <= set(v.get("features", [])):
                return str(v["version"])
        raise NotRetrainable(
            f"feature view {view} runs no version with the features {features} (the champion "
            f"was trained on {view}@{pinned}); register or promote one (`myelin features views`)"
        )

    async def wait_stored(
        self, bound: int, view: str, version: str, say: Callable[[str], None]
    ) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._timeout
        next_say = loop.time() + 5.0
        applied = 0
        while True:  # the view version has applied EVENTS up to the bound ...
            match = [v for v in await self._versions() if v["version"] == version]
            if not match:
                raise NotRetrainable(f"feature view {view}@{version} is not running")
            if match[0]["state"] == "stopped":
                raise NotRetrainable(
                    f"feature view {view}@{version} stopped: {match[0]['error']}; "
                    "its rows past the failure are missing"
                )
            applied = int(match[0]["position"])
            if applied >= bound:
                break
            if loop.time() > deadline:
                raise BoundNotStored(
                    f"{view}@{version} applied EVENTS up to {applied}, not {bound}, within "
                    f"{self._timeout:.0f}s (MYELIN_RETRAIN_WAIT_S); is the features service behind?"
                )
            if loop.time() > next_say:
                say(f"waiting for {view}@{version}: EVENTS applied to {applied} of {bound}")
                next_say = loop.time() + 5.0
            await asyncio.sleep(0.2)
        # ... and the warehouse stored the raw events, their feature rows and late marks
        want = {
            "warehouse-events": bound,
            "warehouse-features": int((await self._js.stream_info(FEATURES_STREAM)).state.last_seq),
            "warehouse-late": int((await self._js.stream_info(LATE_STREAM)).state.last_seq),
        }
        while True:
            health = msgspec.json.decode(
                await bus.request(self._nc, health_subject("warehouse"), {}, timeout=10)
            )
            positions = {k: int(health["positions"].get(k, 0)) for k in want}
            behind = {k: (positions[k], n) for k, n in want.items() if positions[k] < n}
            if not behind:
                return
            if loop.time() > deadline:
                raise BoundNotStored(
                    "the warehouse has not stored everything up to the bound within "
                    f"{self._timeout:.0f}s (MYELIN_RETRAIN_WAIT_S): "
                    + ", ".join(f"{k} at {p} of {n}" for k, (p, n) in behind.items())
                )
            if loop.time() > next_say:
                say(
                    "waiting for the warehouse: "
                    + ", ".join(f"{k} {p}/{n}" for k, (p, n) in behind.items())
                )
                next_say = loop.time() + 5.0
            await asyncio.sleep(0.2)

    async def query(self, sql: str) -> pa.Table:
        return await sql_client.query(self._nc, sql, timeout=max(self._timeout, 60.0))


# ---------------------------------------------------------------- the job


@dataclass(frozen=True)
class Outcome:
    """A trigger's result: the job (new, or the existing one it was turned to) and whether
    this call ran it."""

    job: RetrainJob
    ran: bool


def _owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class Retrainer:
    """Runs retrain jobs, one at a time in a process (training takes the cores)."""

    def __init__(
        self,
        *,
        registry: ModelRegistry,
        data: TrainingData,
        jobs: JobStore,
        audit: Callable[[AuditRecord], Awaitable[None]],
        settings: Settings,
        trainer: LoadedTrainer | None = None,
        progress: Callable[[str], None] | None = None,
    ) -> None:
        self._registry = registry
        self._data = data
        self._jobs = jobs
        self._audit = audit
        self._s = settings
        self.trainer = trainer or load_trainer(settings.trainer)
        self._say_fn = progress or (lambda msg: log.info("%s", msg))
        self._lock = asyncio.Lock()
        self.owner = _owner()
        self.current = ""  # the job running now ('' when idle)
        self.counts: dict[str, int] = {}  # outcome -> jobs (done, failed, denied, skipped, ...)

    @classmethod
    async def connect(
        cls,
        nc: NATS,
        settings: Settings,
        *,
        trainer: LoadedTrainer | None = None,
        progress: Callable[[str], None] | None = None,
    ) -> Retrainer:
        """A retrainer on the running platform (the service's and the CLI's)."""
        js = bus.jetstream(nc, settings)
        return cls(
            registry=ModelRegistry(nc, js),
            data=NatsTrainingData(nc, js, settings.retrain_wait_s),
            jobs=await JobStore.open(js),
            audit=AuditLog(bus.Publisher(js, settings)),
            settings=settings,
            trainer=trainer,
            progress=progress,
        )

    def _say(self, msg: str) -> None:
        self._say_fn(msg)

    def _count(self, what: str) -> None:
        self.counts[what] = self.counts.get(what, 0) + 1

    async def _record(
        self, action: str, job: RetrainJob, reasons: list[str], *, allow: bool, **extra: Any
    ) -> None:
        doc = {"job": msgspec.to_builtins(job), **extra}
        await self._audit(platform_record(action, job.job_id, reasons, doc, allow=allow))

    async def run(self, trigger: Trigger, *, force: bool = False) -> Outcome:
        """Start the trigger's job, or return the job it already started (``ran=False``).
        Failures are recorded in the job (``state="failed"``, ``transient`` when trying
        again may help), not raised; configuration errors of the trigger itself are."""
        async with self._lock:
            return await self._run(trigger, force)

    async def _run(self, trigger: Trigger, force: bool) -> Outcome:
        check_name(trigger.model)
        now = _now_ms()
        draft = RetrainJob(
            job_id=f"{trigger.model}.{trigger.kind}",
            model=trigger.model,
            state="skipped",
            trigger=trigger.kind,
            trigger_ref=trigger.ref,
            started_ms=now,
            finished_ms=now,
        )
        champion = (await self._registry.aliases(trigger.model)).get("champion")
        if champion is None:
            reason = (
                f"model {trigger.model} has no champion: there is nothing to retrain (promote "
                f"one first: myelin models alias {trigger.model} champion VERSION --requester WHO)"
            )
            return await self._turned_away(draft, reason)
        if trigger.kind == "drift" and trigger.drifted_version != champion:
            reason = (
                f"{trigger.model} v{trigger.drifted_version} drifted, but the champion is "
                f"v{champion}: only the champion is retrained"
            )
            return await self._turned_away(
                msgspec.structs.replace(draft, job_id=job_id(trigger, None)), reason
            )
        bound = trigger.bound
        if trigger.kind != "drift" and bound is None:
            bound = await self._data.last_seq()
        jid = job_id(trigger, bound)
        fresh = msgspec.structs.replace(
            draft,
            job_id=jid,
            state="running",
            owner=self.owner,
            heartbeat_ms=now,
            finished_ms=0,
            bound=bound or 0,
            champion=champion,
        )
        job, claimed = await self._jobs.claim(
            fresh,
            stale_ms=self._s.retrain_stale_s * 1000,
            retry_ms=self._s.retrain_retry_s * 1000,
            force=force,
        )
        if not claimed:
            reason = f"job {jid} already {job.state}" + (
                f" (v{job.version})" if job.version else ""
            )
            self._say(f"retrain {trigger.model}: {reason}; nothing to do")
            self._count("existing")
            await self._record(
                "retrain_skip", job, [reason], allow=False, trigger=trigger.kind, ref=trigger.ref
            )
            return Outcome(job, ran=False)
        self.current = jid
        try:
            return Outcome(await self._execute(job, champion, force), ran=True)
        finally:
            self.current = ""

    async def _turned_away(self, job: RetrainJob, reason: str) -> Outcome:
        job = msgspec.structs.replace(job, reason=reason)
        self._say(f"retrain {job.model}: {reason}")
        self._count("skipped")
        await self._record("retrain_skip", job, [reason], allow=False)
        return Outcome(job, ran=False)

    async def _execute(self, job: RetrainJob, champion: int, force: bool) -> RetrainJob:
        self._say(
            f"retrain {job.model}: job {job.job_id} (attempt {job.attempt}, trigger "
            f"{job.trigger} {job.trigger_ref}) started from champion v{champion}"
        )
        await self._record(
            "retrain_start",
            job,
            [f"retrain of {job.model} v{champion} started ({job.trigger})"],
            allow=True,
        )
        beat = asyncio.create_task(self._heartbeat(job), name=f"heartbeat-{job.job_id}")
        try:
            job = await self._steps(job, champion, force, beat)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):  # the next trigger takes it over at once
                await asyncio.shield(
                    self._finish(job, "failed", "interrupted: the process stopped", transient=True)
                )
            raise
        except JobTakenOver as exc:
            self._say(f"retrain {job.model}: {exc.message}")
            self._count("taken_over")
            return msgspec.structs.replace(job, state="failed", reason=exc.message)
        except Exception as exc:
            reason = exc.message if isinstance(exc, MyelinError) else f"{type(exc).__name__}: {exc}"
            if not isinstance(exc, MyelinError):
                log.exception("retrain job %s failed", job.job_id)
            job = await self._finish(job, "failed", reason, transient=is_transient(exc) is True)
        finally:
            beat.cancel()
            with contextlib.suppress(BaseException):
                await beat
        return job

    async def _finish(
        self, job: RetrainJob, state: JobStateName, reason: str = "", *, transient: bool = False
    ) -> RetrainJob:
        job = await self._jobs.put(
            msgspec.structs.replace(
                job, state=state, reason=reason, transient=transient, finished_ms=_now_ms()
            )
        )
        self._count(state)
        outcome = {
            "done": f"{job.model} v{job.version} registered and put in shadow",
            "denied": f"{job.model} v{job.version} registered; shadow refused: {reason}",
            "failed": f"failed: {reason}",
        }.get(state, state)
        self._say(f"retrain {job.model}: job {job.job_id} {state}: {outcome}")
        await self._record("retrain_finish", job, [outcome], allow=state == "done")
        return job

    async def _heartbeat(self, job: RetrainJob) -> None:
        interval = max(self._s.retrain_stale_s / 4, 0.05)
        while True:
            await asyncio.sleep(interval)
            await self._jobs.touch(job.job_id)

    async def _checkpoint(self, job: RetrainJob, beat: asyncio.Task[None]) -> RetrainJob:
        """Record progress (and stop if the heartbeat found the job taken over)."""
        if beat.done() and not beat.cancelled() and beat.exception() is not None:
            raise JobTakenOver(f"job {job.job_id} was taken over by another process")
        return await self._jobs.put(job)

    async def _steps(
        self, job: RetrainJob, champion: int, force: bool, beat: asyncio.Task[None]
    ) -> RetrainJob:
        s = self._s
        parent = await self._registry.get(job.model, champion)
        prov = parent.provenance
        view, features, spec = _retrainable(parent)
        pinned = next(
            (ref.partition("@")[2] for ref in prov.feature_views if ref.startswith(f"{view}@")), ""
        )
        version = await self._data.feature_version(view, features, pinned)
        if version != pinned:
            self._say(
                f"  {view}@{pinned or '?'} (the champion's) no longer runs: "
                f"reading the served {view}@{version}"
            )
        bound = job.bound or await self._data.last_seq()
        job = await self._checkpoint(msgspec.structs.replace(job, bound=bound), beat)
        self._say(
            f"  champion v{champion}: view {view}@{version}, {len(features)} features, "
            f"labels {spec}; bound EVENTS seq {bound}"
        )
        await self._data.wait_stored(bound, view, version, self._say)
        query = training_set_sql(
            view, features, labels_sql(spec, max_seq=bound), version=version, max_seq=bound
        ).strip()
        t0 = time.perf_counter()
        table = await self._data.query(query)
        fp = await asyncio.to_thread(fingerprint, table, features)
        self._say(
            f"  training set: {table.num_rows:,} rows up to EVENTS seq {bound} in "
            f"{time.perf_counter() - t0:.1f}s (fingerprint {fp[:16]}...)"
        )
        job = await self._checkpoint(
            msgspec.structs.replace(job, fingerprint=fp, rows=table.num_rows), beat
        )
        if table.num_rows < s.retrain_min_rows:
            raise TooFewRows(
                f"the training set up to EVENTS seq {bound} has {table.num_rows} rows; "
                f"at least {s.retrain_min_rows} are needed (MYELIN_RETRAIN_MIN_ROWS): wait for "
                "more events or lower the minimum"
            )
        if not force:  # a crashed attempt may have registered it already
            found = await self._registered(job, fp)
            if found is not None:
                self._say(f"  v{found.version} was registered by an earlier attempt of this job")
                return await self._shadow(job, found)
        split = time_split(table.num_rows, s.retrain_holdout_share)
        self._say(
            f"  training ({self.trainer.spec}) on {split.cut:,} rows, "
            f"holding out the newest {split.rows - split.cut:,} ..."
        )
        t0 = time.perf_counter()
        try:
            fitted: Fitted = await asyncio.to_thread(self.trainer.fn, table, features, split)
        except MyelinError:
            raise
        except Exception as exc:
            raise TrainerError(
                f"trainer {self.trainer.spec} failed: {type(exc).__name__}: {exc}"
            ) from exc
        champion_onnx = await self._registry.artifact(parent)
        ev = await asyncio.to_thread(
            evaluate, table, features, split, fitted.onnx, champion_onnx, list(prov.features)
        )
        m = ev.metrics
        self._say(
            f"  trained and scored in {time.perf_counter() - t0:.1f}s; holdout of {int(m['holdout_rows']):,} "
            f"rows: challenger AUC {m['auc']:.3f} logloss {m['logloss']:.4f}, champion "
            f"v{champion} AUC {m['champion_auc']:.3f} logloss {m['champion_logloss']:.4f}"
        )
        ts = table.column("ts").cast(pa.timestamp("ms", tz="UTC"), safe=False).cast(pa.int64())
        mv = await self._registry.register(
            job.model,
            fitted.onnx,
            inputs=fitted.inputs,
            outputs=fitted.outputs,
            metrics={**fitted.metrics, **m},
            labels=self._labels(job, parent, spec, fp, fitted),
            reference=ev.reference,
            provenance=Provenance(
                training_window=[int(pc.min(ts).as_py()), int(pc.max(ts).as_py())],
                feature_views=[f"{view}@{version}"],
                feature_view=view,
                features=features,
                training_rows=split.cut,
                training_query=query,
                created_by=f"retrain {job.job_id}",
                label_source=prov.label_source,
            ),
        )
        self._say(f"  registered {job.model} v{mv.version}")
        job = await self._checkpoint(
            msgspec.structs.replace(job, version=mv.version, metrics=dict(mv.metrics)), beat
        )
        return await self._shadow(job, mv)

    async def _registered(self, job: RetrainJob, fp: str) -> ModelVersion | None:
        for v in reversed(await self._registry.versions(job.model)):
            mv = await self._registry.get(job.model, v)
            if (
                mv.labels.get("retrain_job") == job.job_id
                and mv.labels.get("training_fingerprint") == fp
            ):
                return mv
        return None

    async def _shadow(self, job: RetrainJob, mv: ModelVersion) -> RetrainJob:
        job = msgspec.structs.replace(job, version=mv.version, metrics=dict(mv.metrics))
        try:
            await self._registry.set_routes(
                job.model, shadow=mv.version, requester=f"retrain:{job.job_id}"
            )
        except PromotionDenied as exc:
            return await self._finish(job, "denied", exc.message)
        return await self._finish(job, "done")

    def _labels(
        self, job: RetrainJob, parent: ModelVersion, spec: str, fp: str, fitted: Fitted
    ) -> dict[str, str]:
        code = code_version()
        return {
            **{f"param_{k}": str(v) for k, v in fitted.params.items()},
            "origin": "retrain",
            "retrain_job": job.job_id,
            "retrain_attempt": str(job.attempt),
            "trigger": job.trigger,
            "trigger_ref": job.trigger_ref,
            "parent_version": str(parent.version),
            "stream_seq_bound": str(job.bound),
            "training_fingerprint": fp,
            TRAINING_LABELS: spec,
            "trainer": self.trainer.spec,
            "trainer_sha256": self.trainer.source_sha256,
            **code,
            "code_version": f"myelin {code['myelin_version']} git {code['git_commit'][:12] or '-'} "
            f"trainer {self.trainer.source_sha256[:12] or '-'}",
        }


def _retrainable(mv: ModelVersion) -> tuple[str, list[str], str]:
    """The champion's feature view, features and labels builder, or why it has none."""
    prov = mv.provenance
    spec = mv.labels.get(TRAINING_LABELS, "")
    missing = [
        what
        for what, ok in (
            ("provenance.feature_view", bool(prov.feature_view)),
            ("provenance.features", bool(prov.features)),
            (f'labels["{TRAINING_LABELS}"] (e.g. "clicked_impressions:60")', bool(spec)),
        )
        if not ok
    ]
    if missing:
        raise NotRetrainable(
            f"{mv.name} v{mv.version} cannot be retrained: it records no {', no '.join(missing)}; "
            "register the champion with them (myelin models register --meta META.json, "
            'with "labels": {"training_labels": "clicked_impressions:60"})'
        )
    labels_sql(spec)  # a builder this build knows
    return prov.feature_view, list(prov.features), spec


# ---------------------------------------------------------------- after shadow


async def advance(
    registry: ModelRegistry,
    name: str,
    version: int,
    *,
    requester: str,
    canary_share: float = 0.1,
) -> str:
    """Ask governance for ``version``'s next stage: shadow -> canary (``canary_share`` of
    the traffic) -> champion. Returns the stage reached; :class:`PromotionDenied` carries
    the policy's reasons. Governance audits each decision."""
    champion = (await registry.aliases(name)).get("champion")
    if version == champion:
        raise RetrainError(f"{name} v{version} is already the champion")
    routes = await registry.routes(name)
    if routes.shadow == version:
        await registry.set_routes(
            name, canary=version, canary_share=canary_share, shadow=0, requester=requester
        )
        return "canary"
    if routes.canary == version:
        await registry.set_alias(name, "champion", version, requester=requester)
        return "champion"
    raise RetrainError(
        f"{name} v{version} is neither the shadow (v{routes.shadow or '-'}) nor the canary "
        f"(v{routes.canary or '-'}): a version advances shadow -> canary -> champion; retrain "
        "it or put it in shadow first"
    )


# ---------------------------------------------------------------- the command line


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


__all__ = [
    "BoundNotStored",
    "Evaluation",
    "JobStore",
    "JobTakenOver",
    "NatsTrainingData",
    "NotRetrainable",
    "Outcome",
    "RetrainError",
    "RetrainJob",
    "Retrainer",
    "TooFewRows",
    "TrainingData",
    "Trigger",
    "advance",
    "code_version",
    "drift_trigger",
    "evaluate",
    "fingerprint",
    "holdout_metrics",
    "job_id",
    "list_jobs",
    "reclaimable",
    "retrain_command",
    "score_onnx",
]
