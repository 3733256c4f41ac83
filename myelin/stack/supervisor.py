"""``myelin up``: engines, provisioning, the five services, readiness and an ordered stop.

Start order: nats-server, redis-server, provisioning, then governance, warehouse, features,
inference, ingest (intake last). Stop order is the reverse (intake first).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from dataclasses import replace
from pathlib import Path
from types import TracebackType
from typing import Any

import msgspec

from myelin import bus
from myelin.errors import MyelinError
from myelin.settings import Settings
from myelin.stack.engines import NatsServer, RedisServer
from myelin.stack.process import ManagedProcess, ProcessError
from myelin.subjects import health_subject

SERVICES = ("governance", "warehouse", "features", "inference", "ingest")


class Stack:
    """The whole platform as one async context manager."""

    def __init__(
        self, settings: Settings, *, log: Any = None, services: tuple[str, ...] = SERVICES
    ) -> None:
        self.settings = settings
        self.services = services
        self._log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.nats: NatsServer | None = None
        self.redis: RedisServer | None = None
        self.procs: dict[str, ManagedProcess] = {}
        self.metrics: dict[str, int] = {}  # process name -> Prometheus port
        self._closed = False
        self._metrics_next = 0

    @property
    def logs_dir(self) -> Path:
        return self.settings.state_dir / "logs"

    async def start(self) -> None:
        s = self.settings
        s.state_dir.mkdir(parents=True, exist_ok=True)
        if "MYELIN_NATS_URL" not in os.environ:
            self.nats = NatsServer(s.state_dir / "nats", s.nats_port, "127.0.0.1")
            self.nats.start()
            await self.nats.wait_ready()
            self._log(f"nats-server   {self.nats.url} (JetStream, data in {s.state_dir / 'nats'})")
        if "MYELIN_REDIS_URL" not in os.environ:
            self.redis = RedisServer(s.state_dir / "redis", s.redis_port, "127.0.0.1")
            self.redis.start()
            await self.redis.wait_ready()
            self._log(f"redis-server  {self.redis.url} (AOF, data in {s.state_dir / 'redis'})")
        nc = await bus.connect(s, "supervisor", reconnect=False)
        try:
            await bus.provision(bus.jetstream(nc, s), s)
        finally:
            await nc.drain()
        self._metrics_next = s.metrics_port  # when set: consecutive ports, one per process
        for service in self.services:
            await self.start_service(service)

    async def start_service(self, service: str) -> None:
        """Start a service's processes (``MYELIN_INGEST_WORKERS`` for ingest) and wait for
        each to report ready."""
        s = self.settings
        env = s.to_env()
        workers = s.ingest_workers if service == "ingest" else 1
        for k in range(1, workers + 1):
            name = service if k == 1 else f"{service}-{k}"
            port = self._metrics_next
            proc = ManagedProcess(
                name,
                [sys.executable, "-m", f"services.{service}"],
                self.logs_dir / f"{name}.log",
                {**env, "MYELIN_INSTANCE": str(k), "MYELIN_METRICS_PORT": str(port or 0)},
            )
            if port:
                self.metrics[name] = port
                self._metrics_next = port + 1
            self.procs[name] = proc
            proc.start()
            await self.wait_ready(name)
            extra = f", metrics :{self.metrics[name]}/metrics" if name in self.metrics else ""
            self._log(f"{name:<13} ready (pid {proc.pid}, log {proc.log_path}{extra})")

    async def wait_ready(self, name: str, timeout: float = 60.0) -> dict[str, Any]:
        proc = self.procs[name]
        nc = await bus.connect(self.settings, "supervisor-health", reconnect=False)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            while True:
                if proc.returncode is not None:
                    tail = _tail(proc.log_path)
                    raise ProcessError(
                        f"{name} exited with {proc.returncode} while starting:\n{tail}"
                    )
                try:
                    raw = await bus.request(nc, health_subject(name), {}, timeout=1.0)
                    result: dict[str, Any] = msgspec.json.decode(raw)
                    return result
                except MyelinError:
                    if loop.time() > deadline:
                        raise ProcessError(
                            f"{name} not ready after {timeout}s; see {proc.log_path}"
                        ) from None
                    await asyncio.sleep(0.1)
        finally:
            await nc.close()

    async def restart_service(self, name: str, *, kill: bool = False) -> None:
        proc = self.procs[name]
        if kill:
            proc.kill()
        await proc.stop()
        new = ManagedProcess(name, proc.argv, proc.log_path, proc.env)
        self.procs[name] = new
        new.start()
        await self.wait_ready(name)

    async def stop(self) -> None:
        if self._closed:
            return
        self._closed = True
        for name in reversed(list(self.procs)):
            code = await self.procs[name].stop(timeout=30.0)
            if code not in (0, None, -15):
                self._log(f"{name} exited with {code}; see {self.procs[name].log_path}")
        for engine in (self.redis, self.nats):
            if engine is not None:
                await engine.stop()

    async def __aenter__(self) -> Stack:
        try:
            await self.start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()


def _tail(path: Path, lines: int = 30) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return ""


def with_ports(settings: Settings, **ports: Any) -> Settings:
    """Settings with some ports replaced and URLs that follow them (tests, demo)."""
    s = replace(settings, **ports)
    return replace(
        s,
        nats_url=f"nats://127.0.0.1:{s.nats_port}"
        if "MYELIN_NATS_URL" not in os.environ
        else s.nats_url,
        redis_url=f"redis://127.0.0.1:{s.redis_port}/0"
        if "MYELIN_REDIS_URL" not in os.environ
        else s.redis_url,
    )
