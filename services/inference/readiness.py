"""Readiness: the loaded models' state plus background probes of Redis and JetStream,
published to ``grpc.health.v1`` and answered to OIP ``ServerReady`` and ``myelin status``.

Probes run on their own schedule and only their last results are read, so no request or
readiness check ever waits on a dependency. A probe result older than ``stale_after_s``
counts as a failure: a stalled prober must not keep an old "reachable" alive.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from grpc_health.v1 import health_pb2
from grpc_health.v1.health import aio as health_aio

from myelin.gen import grpc_predict_v2_pb2 as oip
from myelin.gen import myelin_predict_pb2 as mp
from services.inference.model_host import ModelHost

log = logging.getLogger(__name__)

# The overall server ("") and each service it serves, all with the same status: every one
# of them needs the models and both dependencies.
HEALTH_SERVICES = (
    "",
    oip.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name,
    mp.DESCRIPTOR.services_by_name["Predictor"].full_name,
)


class Probe:
    """One dependency, checked by ``check`` (which must raise when it is unreachable)."""

    def __init__(self, name: str, check: Callable[[], Awaitable[object]], timeout_s: float) -> None:
        self.name = name
        self._check = check
        self._timeout = timeout_s
        self.ok = False
        self.error = ""
        self.at = 0.0  # monotonic time of the last result; 0: never probed

    async def run_once(self) -> None:
        try:
            await asyncio.wait_for(self._check(), self._timeout)
        except TimeoutError:
            self.ok, self.error = False, f"no answer within {self._timeout:g} s"
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is None or task.cancelling():
                raise
            # a client cancelled its own request (e.g. on a reconnect): a failed probe
            self.ok, self.error = False, "the check was cancelled"
        except Exception as exc:  # noqa: BLE001 - any failure means "unreachable"
            self.ok, self.error = False, f"{type(exc).__name__}({exc})"
        else:
            self.ok, self.error = True, ""
        self.at = time.monotonic()

    def problem(self, now: float, stale_after_s: float) -> str | None:
        if not self.at:
            return f"{self.name} not probed yet"
        if now - self.at > stale_after_s:
            return f"{self.name} probe is stale (last result {now - self.at:.1f} s ago)"
        if not self.ok:
            return f"{self.name} unreachable: {self.error}"
        return None


class Readiness:
    """Ready = every alias target of every known model loaded, warmed and allowed, and every
    probe fresh and OK (Triton's strict readiness)."""

    def __init__(
        self,
        host: ModelHost,
        probes: list[Probe],
        interval_s: float = 1.0,
        checks: list[Callable[[], str | None]] | None = None,
    ) -> None:
        """``checks``: more conditions read from memory (e.g. the ledger's queue), each a
        reason when not ready."""
        self.host = host
        self.probes = probes
        self.checks = checks or []
        self.interval_s = interval_s
        self.stale_after_s = 3 * interval_s
        self.health = health_aio.HealthServicer()
        self._published: bool | None = None
        # the model watch and the prober both publish; statuses must follow the last verdict
        self._publishing = asyncio.Lock()

    def reasons(self) -> list[str]:
        now = time.monotonic()
        probes = [p.problem(now, self.stale_after_s) for p in self.probes]
        probes += [check() for check in self.checks]
        return [r for r in probes if r] + self.host.not_ready()

    def ready(self) -> bool:
        return not self.reasons()

    async def published_ready(self) -> bool:
        """Readiness now, published first: ``ServerReady`` and ``grpc.health.v1`` never
        disagree (a client reading one and then the other saw SERVING lag behind)."""
        await self.publish()
        return bool(self._published)

    async def publish(self) -> None:
        """Set the health statuses if readiness changed (``Watch`` streams see each change)."""
        async with self._publishing:
            reasons = self.reasons()
            ready = not reasons
            if ready == self._published:
                return
            status = (
                health_pb2.HealthCheckResponse.SERVING
                if ready
                else health_pb2.HealthCheckResponse.NOT_SERVING
            )
            for service in HEALTH_SERVICES:
                await self.health.set(service, status)
            if ready:
                log.info("ready")
            elif self._published is not None:
                log.warning("not ready: %s", "; ".join(reasons))
            self._published = ready

    async def probe_once(self) -> None:
        await asyncio.gather(*(p.run_once() for p in self.probes))
        await self.publish()

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.probe_once()
            except Exception:  # a dead prober would leave the server stale, i.e. not ready
                log.exception("readiness probe round failed")

    async def shutdown(self) -> None:
        """NOT_SERVING from now on, so balancers drain this server before it stops."""
        await self.health.enter_graceful_shutdown()
