"""ingest composition root: contracts registry + tokenizer + limits + publisher ->
HTTP, NATS request-reply and JetStream-inbox endpoints."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from aiohttp import web
from nats.aio.client import Client as NATS

from myelin import bus, topology
from myelin.api_tokens import TokenBook
from myelin.consume import PullLoop, ensure_consumer
from myelin.contracts.store import ContractStore
from myelin.dead_letters import consumer_dead_letters
from myelin.pii import load_tokenizer
from myelin.settings import Settings
from myelin.subject_keys import SubjectKeys
from myelin.tasks import cancel_all
from services.ingest.http_api import DOOR, build_app
from services.ingest.ingestor import Ingestor
from services.ingest.logic import Limits, RecentIds, Validator, sanitize
from services.ingest.nats_api import serve_ingest
from services.ingest.stream_api import inbox_handler

log = logging.getLogger(__name__)


def limits_from(s: Settings) -> Limits:
    return Limits(
        max_event_bytes=s.max_event_bytes,
        max_batch_bytes=s.max_batch_bytes,
        max_batch_events=s.max_batch_events,
        partitions=s.partitions,
        max_future_skew_ms=int(s.max_future_skew_s * 1000),
        max_age_ms=int(s.max_event_age_s * 1000),
        hot_keys=frozenset(k.strip() for k in s.hot_keys.split(",") if k.strip()),
        salt_buckets=s.salt_buckets,
    )


class IngestApp:
    name = "ingest"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.ingestor: Ingestor | None = None
        self._nc: NATS | None = None
        self._sub: Any = None
        self._runner: web.AppRunner | None = None
        self._inbox: PullLoop | None = None
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        s = self.settings
        self._nc = await bus.connect(s, self.name)
        js = bus.jetstream(self._nc, s)
        store = ContractStore(js)
        registry = await store.registry()
        tokenizer = load_tokenizer(s.pii_keys.get(), s.pii_active_kid, s.state_dir)
        validator = Validator(registry, limits_from(s), tokenizer)
        log.info("%d contracts loaded; PII key id %s", len(registry), tokenizer.kid)
        self.ingestor = Ingestor(
            validator,
            bus.Publisher(js, s),
            max_inflight_events=max(s.publish_window * 8, s.max_batch_events),
            recent=RecentIds(
                max_items=500_000 if s.dedupe else 0, ttl_ms=int(s.duplicate_window_s * 1000)
            ),
            # PII sealed with each subject's own key: erasure destroys one key
            subject_keys=SubjectKeys(js, tokenizer),
        )
        self._tasks.append(asyncio.create_task(self._follow_registry(store), name="contracts"))
        self._sub = await serve_ingest(self._nc, self.ingestor)
        inbox = topology.durable(topology.INGEST_INBOX, s)  # shared by every ingest worker
        await ensure_consumer(
            js,
            inbox.stream,
            inbox.name,
            inbox.filter_subject,
            max_ack_pending=inbox.max_ack_pending,
            ack_wait_s=inbox.ack_wait_s,
            shared=inbox.shared,
        )
        ingestor = self.ingestor

        def sanitized(data: bytes) -> str:
            v = ingestor.validator  # the current registry: PII fields of known contracts
            return sanitize(data[: v.limits.max_batch_bytes], v.registry, v.tok).decode(
                "utf-8", errors="replace"
            )

        self._inbox = PullLoop(
            js,
            inbox.stream,
            inbox.name,
            inbox_handler(self.ingestor, bus.authenticated(self._nc)),
            batch=500,
            shared=True,
            dead_letter=consumer_dead_letters(
                bus.Publisher(js, s),
                inbox.name,
                sanitize=sanitized,
                producer_of=lambda m: m.subject.removeprefix("myelin.ingest."),
            ),
        )
        self._tasks.append(asyncio.create_task(self._inbox.run(), name="ingest-inbox"))
        nc = self._nc

        async def audit_refusal(action: str, caller: str, reason: str) -> None:
            await bus.audit_refusal(nc, caller, DOOR, action=action, reason=reason)

        self._runner = web.AppRunner(
            build_app(self.ingestor, TokenBook.load(s), audit_refusal), access_log=None
        )
        await self._runner.setup()
        # reuse_port: several ingest workers can share the port; the kernel spreads connections.
        await web.TCPSite(self._runner, s.host, s.ingest_http_port, reuse_port=True).start()

    async def _follow_registry(self, store: ContractStore, interval_s: float = 2.0) -> None:
        """New contract versions registered at run time are picked up without a restart."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                registry = await store.registry()
            except Exception as exc:  # noqa: BLE001 - NATS restarting: keep the current registry
                log.warning("contracts refresh failed: %r", exc)
                continue
            ing = self.ingestor
            if ing is not None and registry.specs() != ing.validator.registry.specs():
                ing.validator = Validator(registry, ing.validator.limits, ing.validator.tok)
                log.info("contracts registry updated: %d contracts", len(registry))

    async def stop(self) -> None:
        # Intake first (HTTP, NATS endpoint, inbox), then drain the connection.
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._sub is not None:
            await self._sub.unsubscribe()
            self._sub = None
        if self._inbox is not None:
            self._inbox.stop()
        inbox = [t for t in self._tasks if t.get_name() == "ingest-inbox"]
        await cancel_all(t for t in self._tasks if t.get_name() != "ingest-inbox")
        for t in inbox:  # stopped above: it finishes what it holds
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._tasks.clear()
        if self._nc is not None:
            await self._nc.drain()
            self._nc = None

    def status(self) -> dict[str, Any]:
        port = self.settings.ingest_http_port
        inbox = self._inbox
        base: dict[str, Any] = {
            "http": f"http://{self.settings.host}:{port}/v1/events",
            # ready: the HTTP endpoint is up and the inbox flows (not stuck retrying)
            "ready": self._runner is not None and inbox is not None and inbox.healthy,
            "not_ready": [f"ingest-inbox: {inbox.snapshot()['error']}"]
            if inbox is not None and not inbox.healthy
            else [],
            "inbox": inbox.snapshot() if inbox is not None else {},
        }
        return {**base, **(self.ingestor.status() if self.ingestor else {})}
