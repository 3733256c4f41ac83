"""Where a job's data comes from: the EVENTS stream's position (the bound), the feature
view version to read, waiting until the features service has applied everything up to
the bound and the warehouse has stored it, and the bounded SQL."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, Protocol

import msgspec
import pyarrow as pa
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from myelin import bus, sql_client
from myelin.retraining.errors import BoundNotStored, NotRetrainable
from myelin.subjects import (
    EVENTS_STREAM,
    FEATURES_STREAM,
    LATE_STREAM,
    RPC_FEATURES_VIEWS,
    health_subject,
)


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
