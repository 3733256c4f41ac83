"""The policy decision point: cached evaluation plus an audit record for every decision."""

from __future__ import annotations

import time
import uuid
from collections.abc import Awaitable, Callable

from myelin.records import AuditRecord
from services.governance.logic import (
    Decision,
    DecisionRequest,
    TTLCache,
    audit_record,
    cache_key,
    interpret,
)
from services.governance.policy_engines import PolicyEngine


class Decider:
    def __init__(
        self,
        engine: PolicyEngine,
        audit: Callable[[AuditRecord], Awaitable[None]],
        cache_ttl_s: float,
    ) -> None:
        self._engine = engine
        self._audit = audit
        self._cache = TTLCache(cache_ttl_s)
        self.decisions = 0
        self.denials = 0

    async def decide(self, req: DecisionRequest) -> Decision:
        now = time.monotonic()
        key = cache_key(req, self._engine.version)
        result = self._cache.get(key, now)
        cached = result is not None
        if result is None:
            result = interpret(await self._engine.evaluate(f"myelin.{req.action}", req.input))
            self._cache.put(key, result, now)
        decision = Decision(
            decision_id=uuid.uuid4().hex,
            action=req.action,
            subject=req.subject,
            allow=result.allow,
            reasons=list(result.reasons),
            policy_version=self._engine.version,
            cached=cached,
        )
        # The decision is only returned once its audit record is stored.
        await self._audit(audit_record(decision, req))
        self.decisions += 1
        self.denials += 0 if decision.allow else 1
        return decision
