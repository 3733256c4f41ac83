"""governance composition root: policies -> engine -> decider -> NATS endpoint."""

from __future__ import annotations

import logging
from typing import Any

from nats.aio.client import Client as NATS

from myelin import bus
from myelin.audit import AuditTrail
from myelin.models import ModelRegistry
from myelin.settings import Settings
from myelin.subject_keys import SubjectKeys
from services.governance.auth_audit import watch_refused_connections
from services.governance.decider import Decider
from services.governance.erasure import Eraser
from services.governance.logic import policy_version
from services.governance.nats_api import serve_decisions, serve_erasure, serve_registry_owner
from services.governance.policy_engines import OpaEngine, PolicyEngine, RegoEngine, load_policies
from services.governance.serving_owner import ServingOwner

log = logging.getLogger(__name__)


class GovernanceApp:
    name = "governance"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._nc: NATS | None = None
        self._subs: list[Any] = []
        self._auth_audit: NATS | None = None  # hears refused NATS connections
        self._engine: PolicyEngine | None = None
        self.decider: Decider | None = None
        self._audit: AuditTrail | None = None

    async def start(self) -> None:
        s = self.settings
        sources = load_policies(s.policy_dir)
        version = policy_version(sources)
        self._engine = (
            OpaEngine(s.opa_url, sources, version) if s.opa_url else RegoEngine(sources, version)
        )
        log.info(
            "policies %s loaded (version %s, engine %s)",
            sorted(sources),
            version,
            type(self._engine).__name__,
        )
        self._nc = await bus.connect(s, self.name)
        js = bus.jetstream(self._nc, s)
        # decisions return once their record is on the connection, ahead of the reply;
        # acknowledged behind it (see myelin.audit)
        audit = self._audit = AuditTrail(self._nc, s)
        await audit.start()
        self.decider = Decider(self._engine, audit, s.policy_cache_ttl_s)
        # what was done already is recorded whatever the trail's lag (see AuditTrail)
        done = audit.after_the_fact
        owner = ServingOwner(ModelRegistry(self._nc, js), self.decider.decide, done)
        # erasure destroys keys, never reads them: no PII key needed here
        eraser = Eraser(self._nc, SubjectKeys(js, None), self.decider.decide, done)
        self._auth_audit = await watch_refused_connections(s, done)
        self._subs = [
            await serve_decisions(self._nc, self.decider),
            *await serve_registry_owner(self._nc, owner),
            await serve_erasure(self._nc, eraser),
        ]

    async def stop(self) -> None:
        for sub in self._subs:
            await sub.unsubscribe()
        self._subs = []
        if self._auth_audit is not None:
            await self._auth_audit.close()
            self._auth_audit = None
        if self._audit is not None:  # the records in flight are stored before leaving
            await self._audit.close()
        if self._nc is not None:
            await self._nc.drain()
            self._nc = None
        if self._engine is not None:
            await self._engine.close()
            self._engine = None

    def status(self) -> dict[str, Any]:
        d, trail = self.decider, self._audit
        lagging = trail is not None and trail.lagging()
        return {
            # policies compiled, and the audit trail keeps up (else decisions are withheld)
            "ready": d is not None and not lagging,
            "not_ready": [f"audit trail lags: {trail.last_error}"] if trail and lagging else [],
            **(trail.snapshot() if trail else {}),
            "policy_version": self._engine.version if self._engine else "",
            "decisions": d.decisions if d else 0,
            "denials": d.denials if d else 0,
        }
