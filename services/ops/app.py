"""ops composition root: a NATS connection, the collector, the page's HTTP server."""

from __future__ import annotations

import contextlib
from typing import Any

from aiohttp import web
from nats.aio.client import Client as NATS

from myelin import bus
from myelin.settings import Settings
from services.ops.collector import Collector
from services.ops.http_page import ops_app


class OpsApp:
    name = "ops"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._nc: NATS | None = None
        self.collector: Collector | None = None
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://{self.settings.host}:{self.settings.ops_http_port}/"

    async def start(self) -> None:
        s = self.settings
        self._nc = await bus.connect(s, self.name)
        self.collector = Collector(self._nc, s)
        self.collector.start()
        if s.ops_http_port:
            self._runner = web.AppRunner(ops_app(self.collector), access_log=None)
            await self._runner.setup()
            await web.TCPSite(self._runner, s.host, s.ops_http_port).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self.collector is not None:
            await self.collector.stop()
        if self._nc is not None:
            with contextlib.suppress(Exception):
                await self._nc.drain()
            self._nc = None

    def status(self) -> dict[str, Any]:
        c = self.collector
        return {
            "ready": c is not None
            and (self._runner is not None or not self.settings.ops_http_port),
            "page": self.url if self.settings.ops_http_port else "",
            "rounds": c.rounds if c else 0,
            "unreachable": c.unreachable if c else [],
        }
