"""features composition root.

Owns: for each feature view version, one EVENTS pull consumer per partition it owns (all
of them in a single process), each feeding its own pipeline: online values to Redis,
offline values to the FEATURES stream; the feature view registry, replays and the
consistency check. ClickHouse belongs to the warehouse service.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from typing import Any

import redis.asyncio as aioredis
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from myelin import bus, online, redis_users, slis, telemetry
from myelin.audit import AuditLog, platform_record
from myelin.consume import PullLoop, ensure_consumer
from myelin.contracts import ContractRegistry
from myelin.contracts.store import ContractStore
from myelin.decisions import GovernanceClient
from myelin.errors import Retryable
from myelin.online import OnlineReader
from myelin.service import BatchGc
from myelin.settings import Settings
from myelin.subjects import EVENTS_STREAM, event_subject
from myelin.tasks import cancel_all
from services.features.event_dead_letters import event_dead_letters
from services.features.feature_rows import RowsSink, rows_publisher
from services.features.late_sink import late_publisher
from services.features.leases import PartitionLeases
from services.features.logic import WindowEngine
from services.features.online_store import OnlineStore
from services.features.pipeline import FeaturePipeline
from services.features.progress import combine, stored_positions, subject_last_seqs
from services.features.replay import Replayer
from services.features.rpc import serve_check, serve_erase, serve_replay, serve_views
from services.features.view_registry import ViewRegistry
from services.features.view_versions import (
    PartitionRunner,
    VersionRunner,
    ViewVersions,
    consumer_name,
)
from services.features.views import VIEWS, FeatureView, InvalidView, contract_problems

log = logging.getLogger(__name__)
PROGRESS_EVERY_S = 0.2  # how often each version's position is read back
SYNC_EVERY_S = 2.0  # how often a worker of several re-reads the registered versions


class HotKeysUnsupported(ValueError):
    """Salted hot keys and partition-owned feature state do not go together."""


class PartitionMoved(Retryable):
    """This worker lost the partition's lease; the batch is not written (the loop waits
    for the lease manager to stop the partition here)."""

    code = "partition_moved"


class FeaturesApp:
    name = "features"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._nc: NATS | None = None
        self._js: JetStreamContext | None = None
        self._redis: aioredis.Redis | None = None
        self.views: ViewVersions | None = None
        self._subs: list[Any] = []
        self.replayer: Replayer | None = None
        self.reader: OnlineReader | None = None
        self.view_registry: ViewRegistry | None = None
        self._contracts: ContractStore | None = None
        self.registry: ContractRegistry | None = None
        self.primary = VIEWS[0].name  # the view the top-level status fields describe
        self.gc = BatchGc(settings.gc_full_every_s)
        self.broken_versions: dict[str, str] = {}  # stored definitions that do not read
        self._progress: asyncio.Task[None] | None = None
        self.leases: PartitionLeases | None = None
        self._lease_task: asyncio.Task[None] | None = None
        self._parts_lock = asyncio.Lock()  # partitions start and stop one at a time
        instance = os.environ.get("MYELIN_INSTANCE", "1")
        self.worker = os.environ.get("MYELIN_FEATURES_WORKER") or (
            f"{socket.gethostname()}-features-{instance}"
        )

    async def start(self) -> None:
        s = self.settings
        self._redis = online.connect(redis_users.client_url(s), s.redis_cluster)
        await self._redis.ping()
        self._nc = await bus.connect(s, self.name)
        js = self._js = bus.jetstream(self._nc, s)
        self._contracts = ContractStore(js)
        self.registry = await self._contracts.registry()
        self.view_registry = ViewRegistry(js)
        if s.hot_keys:
            raise HotKeysUnsupported(
                "MYELIN_HOT_KEYS spreads a key's events over several partitions, and feature "
                "state is kept and owned per partition: a salted key's windows would be split. "
                "Unset MYELIN_HOT_KEYS for a stack that runs the features service"
            )
        self.views = ViewVersions(
            self.view_registry,
            GovernanceClient(self._nc),
            self._start_version,
            self._stop_version,
            self._stream_last_seq,
            self._refresh,
            self.primary,
            self._check_view,
        )
        for view in VIEWS:  # views declared in code; a changed definition is a new version
            problems = await self._check_view(view)
            if problems:
                raise InvalidView(f"view {view.ref} in code: " + "; ".join(problems))
            await self.view_registry.register(view)
        stored, self.broken_versions = await self.view_registry.versions()
        for key, why in self.broken_versions.items():
            log.error("stored feature view version %s is not run: %s", key, why)
        for view in stored:
            await self.views.run(view)
        self.replayer = Replayer(
            self._nc,
            js,
            self.rows_sink,
            self._contracts.registry,
            GovernanceClient(self._nc),
            self.views.engine_for,
            batch=s.features_batch,
        )
        self._subs.append(await serve_replay(self._nc, self.replayer))
        self.reader = OnlineReader(self._redis)
        self._subs.append(await serve_check(self._nc, self))
        self._subs.append(await serve_views(self._nc, self))
        self._subs.append(await serve_erase(self._nc, self))
        self.leases = PartitionLeases(
            js,
            self.worker,
            s.partitions,
            s.features_lease_s,
            self._gain,
            self._lose,
            s.stream_replicas,
        )
        await self.leases.open()
        await self.leases.tick()  # alone, it holds every partition from here on
        self._lease_task = asyncio.create_task(self.leases.run(), name="features-leases")
        await self._refresh(*self.views.runners.values())
        self._progress = asyncio.create_task(self._watch_progress(), name="features-progress")

    async def _check_view(self, view: FeatureView) -> list[str]:
        """What keeps ``view`` from running: its reads against the contracts registered now
        (re-read: one may have been registered a moment ago), and a smoke run of its
        generated code."""
        assert self._contracts is not None
        self.registry = await self._contracts.registry()
        problems = contract_problems(view, self.registry)
        try:
            WindowEngine(view).smoke_test()
        except Exception as exc:  # noqa: BLE001 - reported as a refusal, with what failed
            problems.append(f"its generated code fails: {type(exc).__name__}: {exc}")
        return problems

    @property
    def contracts(self) -> ContractStore:
        assert self._contracts is not None
        return self._contracts

    def rows_sink(self, id_prefix: str = "fv") -> RowsSink:
        assert self._js is not None
        return rows_publisher(bus.Publisher(self._js, self.settings), id_prefix)

    async def _stream_last_seq(self) -> int:
        assert self._js is not None
        return int((await self._js.stream_info(EVENTS_STREAM)).state.last_seq)

    async def _refresh(self, *runners: VersionRunner) -> None:
        """Brings the versions' positions, lags and served flags up to date: the stream's
        ends are read once for all of them."""
        assert self._js is not None and self._redis is not None
        s = self.settings
        last, subject_last = await subject_last_seqs(self._js, s.partitions)
        for runner in runners:
            view = runner.view
            positions = await stored_positions(
                self._redis, view.name, view.content_hash, s.partitions
            )
            got = combine(last, subject_last, positions)
            runner.position, runner.lag_messages = got.position, got.lag_messages
            runner.served = await runner.store.served() == view.content_hash

    async def _watch_progress(self) -> None:
        """Keeps every version's position and lag current for the status (a version's
        partitions may be applied by other workers: Redis and the stream are the truth)."""
        synced = time.monotonic()
        while True:
            try:
                await self._refresh(*(self.views.runners.values() if self.views else []))
            except Exception as exc:  # noqa: BLE001 - reported as stale, tried again
                log.debug("progress not read: %r", exc)
            if self.settings.features_workers > 1 and time.monotonic() - synced > SYNC_EVERY_S:
                synced = time.monotonic()
                try:  # versions registered or retired through another worker
                    await self._sync_versions()
                except Exception as exc:  # noqa: BLE001 - tried again
                    log.warning("feature view versions not synced: %r", exc)
            await asyncio.sleep(PROGRESS_EVERY_S)

    async def _sync_versions(self) -> None:
        assert self.views is not None and self.view_registry is not None
        stored, _broken = await self.view_registry.versions()
        wanted = {v.content_hash: v for v in stored}
        for version, view in wanted.items():
            if version not in self.views.runners:
                log.info("running %s, registered through another worker", view.ref)
                await self.views.run(view)
        for version, runner in list(self.views.runners.items()):
            if version not in wanted:
                log.info("stopping %s, retired through another worker", runner.view.ref)
                await self._stop_version(runner)
                del self.views.runners[version]
                # a batch this worker applied after the retiring worker dropped the
                # version's keys wrote some back: this worker's loops are stopped now
                await runner.store.drop()

    async def _stop_version(self, runner: VersionRunner) -> None:
        async with self._parts_lock:
            for p in list(runner.parts):
                await self._stop_part(runner, p, delete_consumer=True)

    async def _start_version(self, view: FeatureView) -> VersionRunner:
        async with self._parts_lock:
            return await self._start_version_parts(view)

    async def _start_version_parts(self, view: FeatureView) -> VersionRunner:
        assert self._js is not None and self._redis is not None
        s = self.settings
        store = OnlineStore(self._redis, view, s.online_ttl_s, 0, s.partitions)
        await store.register_view()
        runner = VersionRunner(view, WindowEngine(view, dedupe=s.dedupe), store)
        # the consumer of layout v3 (one per version) is not used any more
        with contextlib.suppress(NotFoundError):
            await self._js.delete_consumer(EVENTS_STREAM, consumer_name(view))
        for p in self.owned_partitions():
            await self._start_part(runner, p)
        return runner

    def owned_partitions(self) -> list[int]:
        """The partitions this worker holds the leases of (all of them when it is alone)."""
        return self.leases.owned if self.leases else []

    async def _gain(self, p: int) -> None:
        async with self._parts_lock:
            for runner in list(self.views.runners.values() if self.views else []):
                if not runner.failed and p not in runner.parts:
                    await self._start_part(runner, p)
        log.info("%s: partition %d is applied here now", self.worker, p)

    async def _lose(self, p: int) -> None:
        async with self._parts_lock:
            for runner in list(self.views.runners.values() if self.views else []):
                await self._stop_part(runner, p, delete_consumer=False)
        log.info("%s: partition %d given up", self.worker, p)

    async def _stop_part(self, runner: VersionRunner, p: int, delete_consumer: bool) -> None:
        part = runner.parts.pop(p, None)
        if part is None:
            return
        part.loop.stop()
        await asyncio.gather(part.task, return_exceptions=True)
        runner.retire_part(part)
        if delete_consumer and self._js is not None:
            with contextlib.suppress(NotFoundError):
                await self._js.delete_consumer(EVENTS_STREAM, consumer_name(runner.view, p))

    async def _start_part(self, runner: VersionRunner, p: int) -> None:
        assert self._js is not None and self._redis is not None
        assert self._contracts is not None and self.registry is not None
        s, js, view = self.settings, self._js, runner.view
        store = runner.store.for_partition(p)
        pub = bus.Publisher(js, s)
        durable = consumer_name(view, p)
        leases = self.leases

        async def fence() -> None:
            if leases is not None and not await leases.confirm(p):
                raise PartitionMoved(
                    f"{self.worker} no longer holds partition {p} of {view.ref}: its lease "
                    "expired or another worker took it (nothing of this batch was written)"
                )

        pipeline = FeaturePipeline(
            runner.engine,
            self.registry,
            store,
            self.rows_sink(),
            reload_registry=self._contracts.registry,
            late_sink=late_publisher(pub),
            dead_letters=event_dead_letters(pub, durable),
            fence=fence if leases is not None else None,
        )
        position = await pipeline.start()
        # Redis holds the committed position; the consumer is re-created to start right after
        # it (a new version starts at the beginning of the stream: its backfill).
        await ensure_consumer(
            js,
            EVENTS_STREAM,
            durable,
            event_subject(p),
            max_ack_pending=s.features_batch * 2,
            ack_wait_s=s.features_ack_wait_s,
            start_seq=position + 1,
        )
        log.info("view %s partition %d resumes after stream sequence %d", view.ref, p, position)

        async def on_events(msgs: list[Msg]) -> None:
            # a child of the consumer's batch span, which links every message's trace
            with telemetry.tracer("myelin.features").start_as_current_span(
                "features batch",
                attributes={
                    "messaging.batch.message_count": len(msgs),
                    "myelin.view": view.ref,
                    "myelin.partition": p,
                },
            ):
                unreadable = await pipeline.process(
                    [(m.metadata.sequence.stream, m.data) for m in msgs]
                )
            if pipeline.committed_oldest_ingest_ms:
                slis.record_freshness(
                    view.ref, time.time() - pipeline.committed_oldest_ingest_ms / 1000
                )
            if unreadable:  # dead-lettered by the pipeline; terminated before the batch ack
                gone = set(unreadable)
                for m in msgs:
                    if m.metadata.sequence.stream in gone:
                        with contextlib.suppress(Exception):
                            await m.term()
            self.gc.after_batch()

        async def on_stopped(exc: BaseException) -> None:
            log.error("view version %s stopped; other views keep flowing: %s", view.ref, exc)
            runner.stopped_error = f"{type(exc).__name__}: {exc}"[:2000]
            for other in runner.parts.values():  # the version stops as a whole
                other.loop.stop()
            record = platform_record(
                "view_failed",
                view.ref,
                [f"{type(exc).__name__}: {exc}"],
                {
                    "view": view.name,
                    "version": view.content_hash,
                    "partition": p,
                    "position": pipeline.stats.position,
                },
                telemetry.trace_id_hex(),
            )
            await AuditLog(pub)(record)

        # The view's own failure stops this version ("stop"); what the input did wrong the
        # pipeline dead-letters itself, and transient trouble is retried.
        loop = PullLoop(
            js,
            EVENTS_STREAM,
            durable,
            on_events,
            batch=s.features_batch,
            linger_s=s.features_linger_s,
            on_poison="stop",
            on_stopped=on_stopped,
        )
        runner.parts[p] = PartitionRunner(
            p, pipeline, loop, asyncio.create_task(loop.run(), name=durable)
        )

    # -- lifecycle --------------------------------------------------------------------------

    async def stop(self) -> None:
        # Stop intake (queries, then consumers), let in-flight batches finish, close sinks.
        for sub in self._subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        self._subs.clear()
        if self.replayer is not None:
            await self.replayer.stop()
        await cancel_all(t for t in (self._lease_task, self._progress) if t is not None)
        if self.leases is not None:  # the others take this worker's partitions at once
            await self.leases.close()
        parts = [
            p for r in (self.views.runners.values() if self.views else []) for p in r.parts.values()
        ]
        for part in parts:
            part.loop.stop()
        await asyncio.gather(*(p.task for p in parts), return_exceptions=True)
        if self._nc is not None:
            with contextlib.suppress(Exception):
                await self._nc.drain()
            self._nc = None
        if self._redis is not None:
            await self._redis.aclose()
            self._redis = None

    def _primary_runner(self) -> VersionRunner | None:
        """The served version of the primary view (the newest-positioned if unknown)."""
        all_runners = self.views.runners.values() if self.views else []
        runners = [r for r in all_runners if r.view.name == self.primary]
        served = [r for r in runners if r.served]
        pick = served or sorted(runners, key=lambda r: -r.position)
        return pick[0] if pick else None

    @property
    def redis(self) -> aioredis.Redis | None:
        return self._redis

    def status(self) -> dict[str, Any]:
        r = self._primary_runner()
        st = r.stats() if r else None
        versions = list(self.views.runners.values()) if self.views else []
        loops = [p.loop for v in versions for p in v.parts.values()]
        snaps = {v.view.ref: v.snapshot() for v in versions}
        stuck = [f"{ref}: {v['error']}" for ref, v in snaps.items() if v["state"] == "retrying"]
        failed = [f"{ref}: {v['error']}" for ref, v in snaps.items() if v["state"] == "stopped"]
        return {
            # ready: every version's consumer flows; a failed version is reported (failed,
            # metrics, audit) but does not make the service unready: the others flow
            "ready": self.views is not None and not stuck,
            "not_ready": stuck,
            "failed_versions": failed
            + [f"{k}: definition does not read: {v}" for k, v in self.broken_versions.items()],
            # per view version, as metrics with a key label (name@hash)
            "version_lag_messages": {ref: v["lag_messages"] for ref, v in snaps.items()},
            "version_watermark_delay_s": {
                ref: v["watermark_delay_s"]
                for ref, v in snaps.items()
                if v["watermark_delay_s"] is not None
            },
            "version_events": {ref: v["events"] for ref, v in snaps.items()},
            "version_late": {ref: v["late"] for ref, v in snaps.items()},
            "version_duplicates": {ref: v["duplicates"] for ref, v in snaps.items()},
            "version_dead_lettered": {ref: v["dead_lettered"] for ref, v in snaps.items()},
            "version_failed": {ref: int(v["state"] == "stopped") for ref, v in snaps.items()},
            "version_retrying": {ref: int(v["state"] == "retrying") for ref, v in snaps.items()},
            "view": r.view.name if r else "",
            "view_hash": r.view.content_hash if r else "",
            "position": st.position if st else 0,
            "events": st.events if st else 0,
            "applied": st.applied if st else 0,
            "duplicates": st.duplicates if st else 0,
            "late": st.late if st else 0,
            "gc_full_collections": self.gc.full_collections,
            "undecodable": st.undecodable if st else 0,
            "feature_rows": st.feature_rows if st else 0,
            "versions": list(snaps.values()),
            "worker": self.worker,
            "partitions": self.owned_partitions(),
            "workers": self.leases.members if self.leases else [],
            "partition_moves": self.leases.moves if self.leases else 0,
            "lease_error": self.leases.last_error if self.leases else "",
            "idle": all(loop.idle for loop in loops),
            "drained": {loop.durable: loop.messages for loop in loops},
            "replay": self.replayer.snapshot() if self.replayer else {},
            "ts_ms": int(time.time() * 1000),
        }
