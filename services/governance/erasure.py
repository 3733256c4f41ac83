"""The right to be forgotten: one request forgets a data subject everywhere it can be.

1. governance's ``erasure`` policy decides (audited, as every decision);
2. the subject's key is destroyed (:mod:`myelin.subject_keys`): every PII token of the
   subject in the immutable streams becomes unreadable, and unmatchable;
3. the features service deletes the subject's online state (every view version);
4. the warehouse deletes the subject's rows (events, feature values, inferences, dead
   letters);
5. an ``erasure`` audit record says what was done, naming the subject by its hash only.

The steps after the decision are idempotent: an erasure cut short is asked again.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
from nats.aio.client import Client as NATS

from myelin import access, bus
from myelin.audit import platform_record
from myelin.errors import MyelinError, Poison
from myelin.records import AuditRecord
from myelin.subject_keys import SubjectKeys, key_name
from myelin.subjects import RPC_FEATURES_ERASE, RPC_WAREHOUSE_ERASE
from services.governance.logic import Decision, DecisionRequest


class EraseRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    subject: str  # the entity id (the contracts' key field, e.g. user_id)
    reason: str = ""  # why: the data subject's request, a ticket
    requester: str = ""  # counts only on a server without authentication


class ErasureDenied(MyelinError):
    code = "erasure_denied"


class Eraser:
    def __init__(
        self,
        nc: NATS,
        keys: SubjectKeys,
        decide: Callable[[DecisionRequest], Awaitable[Decision]],
        audit: Callable[[AuditRecord], Awaitable[None]],
    ) -> None:
        self._nc = nc
        self._keys = keys
        self._decide = decide
        self._audit = audit

    async def erase(self, req: EraseRequest, caller: str) -> dict[str, Any]:
        if not req.subject:
            raise Poison("an erasure names its subject (the entity id)")
        started = time.monotonic()
        requester = access.requester(caller, req.requester)
        subject_hash = key_name(req.subject)
        decision = await self._decide(
            DecisionRequest(
                action="erasure",
                subject=subject_hash,
                input={"requester": requester, "reason": req.reason, "subject_hash": subject_hash},
            )
        )
        if not decision.allow:
            raise ErasureDenied(
                f"erasing {subject_hash} was denied: {'; '.join(decision.reasons)}",
                decision_id=decision.decision_id,
            )
        erased_keys = await self._keys.erase(req.subject)
        body = {"subject": req.subject}
        features = msgspec.json.decode(
            await bus.request(self._nc, RPC_FEATURES_ERASE, body, timeout=60.0)
        )
        warehouse = msgspec.json.decode(
            await bus.request(self._nc, RPC_WAREHOUSE_ERASE, body, timeout=300.0)
        )
        report = {
            "subject_hash": subject_hash,
            "decision_id": decision.decision_id,
            "key_messages_erased": erased_keys,
            "online_entries_deleted": features["deleted"],
            "warehouse_rows_deleted": warehouse["deleted"],
            "seconds": round(time.monotonic() - started, 3),
        }
        await self._audit(
            platform_record(
                "erasure",
                subject_hash,
                [f"subject {subject_hash} erased at the request of {requester}: {req.reason}"],
                {**report, "requester": requester, "reason": req.reason},
                allow=True,
            )
        )
        return report
