"""inference composition root: registry + governance + online reader + recorder -> gRPC."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import grpc
import redis.asyncio as aioredis
from nats.aio.client import Client as NATS

from myelin import bus, online
from myelin.decisions import GovernanceClient
from myelin.models import ModelRegistry
from myelin.online import OnlineReader
from myelin.settings import Settings
from services.inference.grpc_api import build_server
from services.inference.model_host import ModelHost
from services.inference.predictor import Predictor
from services.inference.recorder import Recorder


class InferenceApp:
    name = "inference"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._nc: NATS | None = None
        self._redis: aioredis.Redis | None = None
        self._server: grpc.aio.Server | None = None
        self._watch: asyncio.Task[None] | None = None
        self.recorder: Recorder | None = None
        self.predictor: Predictor | None = None
        self.port = 0

    async def start(self) -> None:
        s = self.settings
        self._nc = await bus.connect(s, self.name)
        js = bus.jetstream(self._nc, s)
        self._redis = online.connect(s.redis_url)
        await self._redis.ping()
        host = ModelHost(ModelRegistry(self._nc, js), GovernanceClient(self._nc), s)
        self.recorder = Recorder(bus.Publisher(js, s))
        self.recorder.start()
        self.predictor = Predictor(host, OnlineReader(self._redis), self.recorder)
        self._watch = asyncio.create_task(host.watch(), name="model-watch")
        self._server, self.port = build_server(self.predictor, s.host, s.inference_grpc_port)
        await self._server.start()

    async def stop(self) -> None:
        # Stop intake (gRPC, with a grace period for in-flight calls), then flush records.
        if self._server is not None:
            await self._server.stop(grace=5.0)
            self._server = None
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
            self._watch = None
        if self.recorder is not None:
            await self.recorder.close()
        if self._nc is not None:
            with contextlib.suppress(Exception):
                await self._nc.drain()
            self._nc = None
        if self._redis is not None:
            await self._redis.aclose()
            self._redis = None

    def status(self) -> dict[str, Any]:
        p = self.predictor
        return {
            "grpc": f"{self.settings.host}:{self.port}",
            "requests": p.requests if p else 0,
            "predictions": p.predictions if p else 0,
            "recorded": self.recorder.published if self.recorder else 0,
            "record_queue": self.recorder.queued if self.recorder else 0,
            **(p.host.status() if p else {}),
        }
