"""The job: from the champion as the parent, a bounded training set, a trained and scored
challenger registered with its lineage, and governance asked to put it in **shadow** (a
refusal is the job's outcome, ``denied``, not an error). Every start, finish and
turned-away trigger is an audit record (actions ``retrain_start``, ``retrain_finish``,
``retrain_skip``); governance audits its own decisions."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import msgspec
import pyarrow as pa
import pyarrow.compute as pc
from nats.aio.client import Client as NATS

from myelin import bus
from myelin.audit import AuditLog, platform_record
from myelin.consume import is_transient
from myelin.errors import MyelinError
from myelin.models import (
    ModelRegistry,
    ModelVersion,
    PromotionDenied,
    Provenance,
    check_name,
)
from myelin.records import AuditRecord
from myelin.retraining.errors import JobTakenOver, NotRetrainable, TooFewRows
from myelin.retraining.evaluation import evaluate
from myelin.retraining.jobs import JobStateName, JobStore, RetrainJob, Trigger, _now_ms, job_id
from myelin.retraining.lineage import TRAINING_LABELS, code_version, fingerprint
from myelin.retraining.training_data import NatsTrainingData, TrainingData
from myelin.settings import Settings
from myelin.tasks import cancel_and_wait
from myelin.trainers import Fitted, LoadedTrainer, TrainerError, load_trainer, time_split
from myelin.training import labels_sql, training_set_sql

log = logging.getLogger(__name__)


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
            await cancel_and_wait(beat)
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
            evaluate,
            table,
            features,
            split,
            fitted.onnx,
            champion_onnx,
            list(prov.features),
            parent.reference.policy if parent.reference is not None else None,
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
