"""Outbound adapter: what the ops page shows, gathered over NATS: every service's health
reply once a second (into :class:`~services.ops.series.Series`), and the newest dead
letters and governance denials from the warehouse's SQL door every few seconds."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import msgspec
from nats.aio.client import Client as NATS

from myelin import bus
from myelin.settings import Settings
from myelin.subjects import RPC_WAREHOUSE_QUERY, health_subject
from myelin.tasks import cancel_all
from services.ops.series import Series

log = logging.getLogger(__name__)
RECENT_ROWS = 20
DEAD_LETTERS_SQL = (
    "SELECT toUnixTimestamp64Milli(ts) AS ts_ms, reason, message, producer_id, event_id "
    f"FROM myelin.dead_letters ORDER BY ts DESC LIMIT {RECENT_ROWS}"
)
DENIALS_SQL = (
    "SELECT toUnixTimestamp64Milli(ts) AS ts_ms, action, subject, reasons, policy_version "
    f"FROM myelin.audit WHERE allow = 0 ORDER BY ts DESC LIMIT {RECENT_ROWS}"
)


def instances(settings: Settings) -> list[str]:
    """Every service instance ``myelin up`` runs with these settings."""
    out = ["governance", "warehouse", "inference", "retrainer"]
    for service, n in (
        ("features", settings.features_workers),
        ("ingest", settings.ingest_workers),
    ):
        out += [service if k == 1 else f"{service}-{k}" for k in range(1, max(n, 1) + 1)]
    return out


class Collector:
    def __init__(
        self, nc: NATS, settings: Settings, every_s: float = 1.0, recent_every_s: float = 5.0
    ) -> None:
        self._nc = nc
        self._instances = instances(settings)
        self.every_s = every_s
        self.recent_every_s = recent_every_s
        self.series = Series()
        self.health: dict[str, dict[str, Any]] = {}  # the last reply of each instance
        self.unreachable: list[str] = []
        self.dead_letters: list[dict[str, Any]] = []
        self.denials: list[dict[str, Any]] = []
        self.recent_error = ""
        self.rounds = 0
        self._tasks: list[asyncio.Task[None]] = []

    async def _health_of(self, name: str) -> dict[str, Any] | None:
        try:
            raw = await bus.request(self._nc, health_subject(name), {}, timeout=self.every_s / 2)
        except Exception:  # noqa: BLE001 - a service down or restarting: shown, not fatal
            return None
        reply: dict[str, Any] = msgspec.json.decode(raw)
        return reply

    async def poll_once(self) -> None:
        replies = await asyncio.gather(*(self._health_of(n) for n in self._instances))
        now = time.time()
        self.health = {n: r for n, r in zip(self._instances, replies, strict=True) if r}
        self.unreachable = [n for n, r in zip(self._instances, replies, strict=True) if not r]
        self.series.add(now, self.health)
        self.rounds += 1

    async def _rows(self, sql: str) -> list[dict[str, Any]]:
        raw = await bus.request(self._nc, RPC_WAREHOUSE_QUERY, {"sql": sql, "max_rows": 100})
        rows: list[dict[str, Any]] = msgspec.json.decode(raw)["data"]
        return rows

    async def recent_once(self) -> None:
        try:
            self.dead_letters = await self._rows(DEAD_LETTERS_SQL)
            self.denials = await self._rows(DENIALS_SQL)
            self.recent_error = ""
        except Exception as exc:  # noqa: BLE001 - the warehouse may be starting: shown
            self.recent_error = f"{type(exc).__name__}: {exc}"

    async def _every(self, seconds: float, fn: Any) -> None:
        while True:
            try:
                await fn()
            except Exception:
                log.exception("ops collector round failed")
            await asyncio.sleep(seconds)

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._every(self.every_s, self.poll_once), name="ops-health"),
            asyncio.create_task(
                self._every(self.recent_every_s, self.recent_once), name="ops-recent"
            ),
        ]

    async def stop(self) -> None:
        await cancel_all(self._tasks)
        self._tasks = []
