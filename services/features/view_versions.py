"""The feature view versions of this process: list, register, promote, retire.

The use case behind ``myelin features views|register|promote|retire``; the composition
root supplies how a version is started and stopped (its consumer, pipeline and stores).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from myelin.consume import PullLoop
from myelin.decisions import GovernanceClient
from services.features.logic import WindowEngine
from services.features.online_store import OnlineStore
from services.features.pipeline import FeaturePipeline, PipelineStats
from services.features.versions import (
    PromotionRefused,
    UnknownVersion,
    VersionError,
    VersionState,
    parse_ref,
    promotion_input,
)
from services.features.view_registry import ViewRegistry
from services.features.views import FeatureView, InvalidView, view_doc, view_from_doc

log = logging.getLogger(__name__)


@dataclass
class PartitionRunner:
    """One partition of a feature view version, owned by this process: its pipeline (with
    its hot states) and its consumer."""

    partition: int
    pipeline: FeaturePipeline
    loop: PullLoop
    task: asyncio.Task[None]


@dataclass
class VersionRunner:
    """One feature view version in this process: the partitions it owns (all of them
    unless workers share the version), and where the version as a whole stands."""

    view: FeatureView
    engine: WindowEngine  # configuration only: shared by the partitions' pipelines
    store: OnlineStore  # version-wide operations (served, promote, drop)
    parts: dict[int, PartitionRunner] = field(default_factory=dict)
    served: bool = False  # kept current by the process that promotes
    # stream sequence up to which every partition is applied (see features.progress), and
    # the EVENTS messages after it
    position: int = 0
    lag_messages: int = 0
    stopped_error: str = ""  # a partition's pipeline failed: the version stops everywhere here
    retired_stats: PipelineStats = field(default_factory=PipelineStats)  # of parts given up

    @property
    def durable(self) -> str:
        return consumer_name(self.view)

    @property
    def failed(self) -> str:
        """Why this version stopped ('' while it runs)."""
        return self.stopped_error or next(
            (p.loop.stopped_error for p in self.parts.values() if p.loop.stopped_error), ""
        )

    @property
    def state(self) -> str:
        """``stopped`` if any partition stopped, ``retrying`` if any retries, else ``ok``."""
        states = {p.loop.state for p in self.parts.values()}
        if self.failed or "stopped" in states:
            return "stopped"
        return "retrying" if "retrying" in states else "ok"

    @property
    def error(self) -> str:
        return self.failed or next(
            (p.loop.last_error for p in self.parts.values() if p.loop.attempts), ""
        )

    def stats(self) -> PipelineStats:
        """This process's figures for the version, summed over its partitions (also those
        it has given up to another worker)."""
        total = PipelineStats()
        total.add(self.retired_stats)
        for part in self.parts.values():
            total.add(part.pipeline.stats)
        total.position = self.position
        return total

    def retire_part(self, part: PartitionRunner) -> None:
        self.retired_stats.add(part.pipeline.stats)

    def watermark_delay_s(self, now_ms: int) -> float | None:
        """How far the newest event time this process has seen for the version trails
        the clock (None: no event yet). Grows when producers stall or the pipeline lags."""
        newest = max(
            (w for part in self.parts.values() for w in part.pipeline.watermarks.values()),
            default=0,
        )
        return max(now_ms - newest, 0) / 1000 if newest else None

    def snapshot(self) -> dict[str, Any]:
        st = self.stats()
        return {
            "view": self.view.name,
            "version": self.view.content_hash,
            "served": self.served,
            "state": self.state,  # ok | retrying | stopped
            "error": self.error,
            "position": self.position,
            "lag_messages": self.lag_messages,
            "watermark_delay_s": self.watermark_delay_s(int(time.time() * 1000)),
            "partitions": sorted(self.parts),  # owned by this process
            "events": st.events,
            "applied": st.applied,
            "duplicates": st.duplicates,
            "late": st.late,
            "dead_lettered": st.undecodable,
        }


def consumer_name(view: FeatureView, partition: int | None = None) -> str:
    """The EVENTS consumer of one partition of a version (``None``: the version's own
    prefix, and the name of its single consumer before layout v4)."""
    base = f"features-{view.name}-{view.content_hash}"
    return base if partition is None else f"{base}-p{partition}"


class ViewVersions:
    def __init__(
        self,
        registry: ViewRegistry,
        governance: GovernanceClient,
        start: Callable[[FeatureView], Awaitable[VersionRunner]],
        stop: Callable[[VersionRunner], Awaitable[None]],
        stream_last_seq: Callable[[], Awaitable[int]],
        refresh: Callable[[VersionRunner], Awaitable[None]],
        primary: str,
        check: Callable[[FeatureView], Awaitable[list[str]]],
    ) -> None:
        """``check``: every problem that keeps a definition from running (empty: it can)."""
        self._check = check
        self._registry = registry
        self._gov = governance
        self._start = start
        self._stop = stop
        self._last_seq = stream_last_seq
        self._refresh = refresh  # brings a runner's position and lag up to date
        self.primary = primary  # the view a bare reference means
        self.runners: dict[str, VersionRunner] = {}  # by content hash
        self._lock = asyncio.Lock()  # one registration / promotion / retirement at a time

    async def run(self, view: FeatureView) -> VersionRunner:
        runner = await self._start(view)
        runner.served = await runner.store.served() == view.content_hash
        self.runners[view.content_hash] = runner
        return runner

    async def runner_for(self, ref: str) -> VersionRunner:
        """``name@hash``, or ``name`` for its served version."""
        name, version = parse_ref(ref or self.primary)
        if not version:
            candidates = [r for r in self.runners.values() if r.view.name == name]
            if not candidates:
                raise UnknownVersion(f"no feature view {name!r}; see `myelin features views`")
            version = await candidates[0].store.served()
        runner = self.runners.get(version)
        if runner is None or runner.view.name != name:
            raise UnknownVersion(f"no version {name}@{version}; see `myelin features views`")
        return runner

    async def engine_for(self, ref: str) -> WindowEngine:
        return (await self.runner_for(ref)).engine

    async def list(self) -> dict[str, Any]:
        last = await self._last_seq()
        out = []
        served: dict[str, str] = {}
        for r in sorted(self.runners.values(), key=lambda r: (r.view.name, r.view.content_hash)):
            if r.view.name not in served:
                served[r.view.name] = await r.store.served()
            await self._refresh(r)
            out.append(
                {
                    **r.snapshot(),
                    "served": served[r.view.name] == r.view.content_hash,
                    "features": list(r.view.feature_names),
                    "definition": view_doc(r.view),
                }
            )
        return {"stream_last_seq": last, "versions": out}

    async def register(self, definition: Any) -> dict[str, Any]:
        view = view_from_doc(definition)
        problems = await self._check(view)
        if problems:
            raise InvalidView(
                f"feature view {view.name} cannot run on the registered contracts: "
                + "; ".join(problems),
                problems=problems,
            )
        async with self._lock:
            created = await self._registry.register(view)
            if view.content_hash not in self.runners:
                await self.run(view)
        runner = self.runners[view.content_hash]
        return {
            "view": view.name,
            "version": view.content_hash,
            "created": created,
            "served": await runner.store.served() == view.content_hash,
        }

    async def promote(self, ref: str, requester: str) -> dict[str, Any]:
        name, version = parse_ref(ref)
        if not version:
            raise VersionError(f"{ref!r}: promote a version, NAME@HASH")
        async with self._lock:
            runner = await self.runner_for(ref)
            served_hash = await runner.store.served()
            if served_hash == version:
                return {"view": name, "version": version, "previous": version, "decision_id": ""}
            old = self.runners.get(served_hash)
            last = await self._last_seq()
            for r in (runner, old):
                if r is not None:
                    await self._refresh(r)
            doc = promotion_input(
                VersionState(runner.view, runner.position, False),
                VersionState(old.view, old.position, True) if old else None,
                last,
                requester,
            )
            verdict = await self._gov.decide("serve_view", runner.view.ref, doc)
            if not verdict.allow:
                raise PromotionRefused(
                    f"serving {runner.view.ref} denied by policy: " + "; ".join(verdict.reasons),
                    decision_id=verdict.decision_id,
                )
            previous = await runner.store.promote()
            for r in self.runners.values():
                if r.view.name == name:
                    r.served = r is runner
        log.info("view %s is served now (was %s), by %s", runner.view.ref, previous, requester)
        return {
            "view": name,
            "version": version,
            "previous": previous,
            "decision_id": verdict.decision_id,
        }

    async def retire(self, ref: str, requester: str) -> dict[str, Any]:
        name, version = parse_ref(ref)
        if not version or not requester:
            raise VersionError("retire a version, NAME@HASH, and say who asks (--requester)")
        async with self._lock:
            runner = await self.runner_for(ref)
            if await runner.store.served() == version and not runner.failed:
                raise VersionError(
                    f"{ref} is the served version: promote another version of {name} first"
                )
            # A failed version may go even when served: it serves nothing current anyway,
            # and reads of the view then say it has no served version.
            await self._stop(runner)
            await runner.store.drop()
            await self._registry.retire(runner.view)
            del self.runners[version]
        log.info("view %s retired by %s (offline rows are kept)", ref, requester)
        return {"view": name, "version": version, "retired": True}
