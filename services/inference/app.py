"""inference composition root: registry + governance + online reader + recorder -> gRPC,
with readiness (models + Redis / JetStream probes) on OIP and grpc.health.v1."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path
from typing import Any

import grpc
import redis.asyncio as aioredis
from nats.aio.client import Client as NATS
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from myelin import bus, online, redis_users
from myelin.api_tokens import TokenBook
from myelin.decisions import GovernanceClient
from myelin.errors import ConfigError
from myelin.models import ModelRegistry
from myelin.online import OnlineReader
from myelin.redis_wire import RedisWire
from myelin.settings import Settings
from myelin.tasks import cancel_and_wait
from services.inference.drift_watch import DriftWatch
from services.inference.grpc_api import build_server
from services.inference.grpc_auth import TokenAuth
from services.inference.model_host import ModelHost
from services.inference.predictor import Predictor
from services.inference.readiness import Probe, Readiness
from services.inference.recorder import Recorder
from services.inference.shadow import ShadowScorer

log = logging.getLogger(__name__)

# A probe answers well within a second or the dependency counts as unreachable.
PROBE_TIMEOUT_S = 0.5


class InferenceApp:
    name = "inference"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._nc: NATS | None = None
        self._redis: aioredis.Redis | None = None
        self._probe_redis: aioredis.Redis | None = None
        self._wire: RedisWire | None = None
        self._server: grpc.aio.Server | None = None
        self._watch: asyncio.Task[None] | None = None
        self._probe: asyncio.Task[None] | None = None
        self.recorder: Recorder | None = None
        self.shadows: ShadowScorer | None = None
        self.drift: DriftWatch | None = None
        self._drift_task: asyncio.Task[None] | None = None
        self.predictor: Predictor | None = None
        self.readiness: Readiness | None = None
        self.port = 0

    async def start(self) -> None:
        s = self.settings
        self._nc = await bus.connect(s, self.name)
        js = bus.jetstream(self._nc, s)
        redis_url = redis_users.client_url(s)  # with the credentials: never logged
        self._redis = online.connect(redis_url, s.redis_cluster)
        await self._redis.ping()
        # the online read, on the hot path: a lean connection to a single Redis node (a
        # Redis Cluster is read through the cluster client, which routes by slot)
        self._wire = None if s.redis_cluster else RedisWire(redis_url)
        # A client of its own, without the serving client's retries, so a probe measures
        # reachability now instead of riding out an outage.
        self._probe_redis = aioredis.Redis.from_url(
            redis_url,
            socket_timeout=PROBE_TIMEOUT_S,
            socket_connect_timeout=PROBE_TIMEOUT_S,
            retry=Retry(NoBackoff(), 0),
        )
        host = ModelHost(ModelRegistry(self._nc, js), GovernanceClient(self._nc), s)
        publisher = bus.Publisher(js, s)
        self.recorder = recorder = Recorder(publisher)
        self.recorder.start()
        self.shadows = ShadowScorer(recorder)
        self.shadows.start()
        self.drift = DriftWatch(host, publisher, s.drift_window_s)
        self.predictor = Predictor(
            host,
            OnlineReader(self._redis, self._wire),
            self.recorder,
            s.ledger_tensor_cap_bytes,
            shadows=self.shadows,
        )

        def ledger() -> str | None:
            if recorder.nearly_full:
                return f"inference ledger queue over 90% full ({recorder.queued} records)"
            return None

        self.readiness = readiness = Readiness(
            host,
            [
                Probe("redis", self._probe_redis.ping, PROBE_TIMEOUT_S),
                Probe("jetstream", js.account_info, PROBE_TIMEOUT_S),
            ],
            checks=[ledger],
        )
        await readiness.publish()  # NOT_SERVING until the models are in
        self._server, self.port = build_server(
            self.predictor,
            readiness,
            s.host,
            s.inference_grpc_port,
            tls=_tls(s),
            interceptors=self._auth(s),
        )
        # Listening early lets liveness checks through; readiness follows the models.
        await self._server.start()
        try:
            await host.refresh_once()  # every alias target loaded and warmed before ready
        except Exception as exc:  # noqa: BLE001 - the watch below keeps trying
            log.warning("initial model load incomplete: %r", exc)
        await readiness.probe_once()
        self._watch = asyncio.create_task(
            host.watch(on_refresh=readiness.publish), name="model-watch"
        )
        self._probe = asyncio.create_task(readiness.run(), name="readiness-probes")
        self._drift_task = asyncio.create_task(self.drift.run(), name="drift-watch")

    def _auth(self, s: Settings) -> list[grpc.aio.ServerInterceptor]:
        tokens = TokenBook.load(s)
        if tokens is None:
            return []
        nc = self._nc
        assert nc is not None

        async def audit_refusal(action: str, caller: str, method: str, reason: str) -> None:
            await bus.audit_refusal(nc, caller, method, action=action, reason=reason)

        return [TokenAuth(tokens, audit_refusal)]

    async def stop(self) -> None:
        # Report NOT_SERVING, stop intake (gRPC, with a grace period for in-flight calls),
        # then flush records.
        if self._probe is not None:
            await cancel_and_wait(self._probe)
            self._probe = None
        if self.readiness is not None:
            await self.readiness.shutdown()
        if self._server is not None:
            await self._server.stop(grace=5.0)
            self._server = None
        if self._watch is not None:
            await cancel_and_wait(self._watch)
            self._watch = None
        if self._drift_task is not None:
            await cancel_and_wait(self._drift_task)
            self._drift_task = None
        if self.shadows is not None:
            await self.shadows.close()
        if self.recorder is not None:
            await self.recorder.close()
        if self._nc is not None:
            with contextlib.suppress(Exception):
                await self._nc.drain()
            self._nc = None
        if self._redis is not None:
            await self._redis.aclose()
            self._redis = None
        if self._wire is not None:
            await self._wire.close()
            self._wire = None
        if self._probe_redis is not None:
            await self._probe_redis.aclose()
            self._probe_redis = None

    def status(self) -> dict[str, Any]:
        p = self.predictor
        # "ready" overrides the health endpoint's default (always true): `myelin status`
        # then shows whether this server would take traffic, and why not.
        reasons = self.readiness.reasons() if self.readiness else ["not started"]
        return {
            "ready": not reasons,
            "not_ready": reasons,
            "grpc": f"{self.settings.host}:{self.port}",
            "requests": p.requests if p else 0,
            "predictions": p.predictions if p else 0,
            "recorded": self.recorder.published if self.recorder else 0,
            "record_queue": self.recorder.queued if self.recorder else 0,
            "records_dropped": self.recorder.dropped if self.recorder else 0,
            "records_deduplicated": self.recorder.deduplicated if self.recorder else 0,
            "predict_batches": p.batcher.batches if p else 0,
            "predict_batches_lingered": p.batcher.lingered if p else 0,
            "shadow_scored": self.shadows.scored if self.shadows else 0,
            "shadow_dropped": self.shadows.dropped if self.shadows else 0,
            "shadow_failed": self.shadows.failed if self.shadows else 0,
            "drift_windows": self.drift.windows if self.drift else 0,
            "drift_detected": dict(self.drift.detected) if self.drift else {},
            "drift_score": dict(self.drift.scores) if self.drift else {},
            "drift_pending_rows": self.drift.pending_rows() if self.drift else {},
            **(p.host.status() if p else {}),
        }


def _tls(s: Settings) -> tuple[bytes, bytes] | None:
    """The gRPC door's key and certificate (``MYELIN_GRPC_TLS_*``), or ``None``."""
    if not (s.grpc_tls_cert_file or s.grpc_tls_key_file):
        return None
    if not (s.grpc_tls_cert_file and s.grpc_tls_key_file):
        raise ConfigError("set both MYELIN_GRPC_TLS_CERT_FILE and MYELIN_GRPC_TLS_KEY_FILE")
    try:
        return Path(s.grpc_tls_key_file).read_bytes(), Path(s.grpc_tls_cert_file).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read the gRPC TLS key or certificate: {exc}") from None
