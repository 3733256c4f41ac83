"""The feature view versions of this process: list, register, promote, retire.

The use case behind ``myelin features views|register|promote|retire``; the composition
root supplies how a version is started and stopped (its consumer, pipeline and stores).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from myelin.consume import PullLoop
from myelin.decisions import GovernanceClient
from services.features.logic import WindowEngine
from services.features.online_store import OnlineStore
from services.features.pipeline import FeaturePipeline
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
class VersionRunner:
    """One feature view version: its pipeline, online store and consumer."""

    view: FeatureView
    store: OnlineStore
    pipeline: FeaturePipeline
    loop: PullLoop
    task: asyncio.Task[None]
    served: bool = False  # kept current by this process, the only one that promotes

    @property
    def durable(self) -> str:
        return consumer_name(self.view)

    @property
    def failed(self) -> str:
        """Why this version stopped ('' while it runs)."""
        return self.loop.stopped_error

    def snapshot(self) -> dict[str, Any]:
        st, loop = self.pipeline.stats, self.loop.snapshot()
        return {
            "view": self.view.name,
            "version": self.view.content_hash,
            "served": self.served,
            "state": loop["state"],  # ok | retrying | stopped
            "error": loop["error"],
            "position": st.position,
            "lag_messages": loop["pending"],
            "events": st.events,
            "applied": st.applied,
            "duplicates": st.duplicates,
            "late": st.late,
            "dead_lettered": st.undecodable,
        }


def consumer_name(view: FeatureView) -> str:
    return f"features-{view.name}-{view.content_hash}"


class ViewVersions:
    def __init__(
        self,
        registry: ViewRegistry,
        governance: GovernanceClient,
        start: Callable[[FeatureView], Awaitable[VersionRunner]],
        stop: Callable[[VersionRunner], Awaitable[None]],
        stream_last_seq: Callable[[], Awaitable[int]],
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
        return (await self.runner_for(ref)).pipeline.engine

    async def list(self) -> dict[str, Any]:
        last = await self._last_seq()
        out = []
        served: dict[str, str] = {}
        for r in sorted(self.runners.values(), key=lambda r: (r.view.name, r.view.content_hash)):
            if r.view.name not in served:
                served[r.view.name] = await r.store.served()
            st = r.pipeline.stats
            out.append(
                {
                    **r.snapshot(),
                    "served": served[r.view.name] == r.view.content_hash,
                    "lag_messages": max(0, last - st.position),
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
            doc = promotion_input(
                VersionState(runner.view, runner.pipeline.stats.position, False),
                VersionState(old.view, old.pipeline.stats.position, True) if old else None,
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
