"""ingest composition root: contracts + limits + publisher -> HTTP and NATS endpoints."""

from __future__ import annotations

from typing import Any

from aiohttp import web
from nats.aio.client import Client as NATS

from myelin import bus
from myelin.contracts import default_registry
from myelin.settings import Settings
from services.ingest.http_api import build_app
from services.ingest.ingestor import Ingestor
from services.ingest.logic import Limits
from services.ingest.nats_api import serve_ingest


class IngestApp:
    name = "ingest"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.ingestor: Ingestor | None = None
        self._nc: NATS | None = None
        self._sub: Any = None
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        s = self.settings
        self._nc = await bus.connect(s, self.name)
        limits = Limits(s.max_event_bytes, s.max_batch_bytes, s.max_batch_events, s.partitions)
        self.ingestor = Ingestor(
            default_registry(),
            limits,
            bus.Publisher(bus.jetstream(self._nc, s), s),
            max_inflight_events=max(s.publish_window * 8, s.max_batch_events),
        )
        self._sub = await serve_ingest(self._nc, self.ingestor)
        self._runner = web.AppRunner(build_app(self.ingestor), access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, s.host, s.ingest_http_port).start()

    async def stop(self) -> None:
        # Intake first (HTTP then NATS), then drain the connection so in-flight publishes finish.
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._sub is not None:
            await self._sub.unsubscribe()
            self._sub = None
        if self._nc is not None:
            await self._nc.drain()
            self._nc = None

    def status(self) -> dict[str, Any]:
        port = self.settings.ingest_http_port
        base = {"http": f"http://{self.settings.host}:{port}/v1/events"}
        return {**base, **(self.ingestor.status() if self.ingestor else {})}
