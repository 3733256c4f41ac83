"""Pure decision logic: request validation, cache keys, policy versions, audit records."""

from __future__ import annotations

import hashlib
import json
import time
import typing
from collections import OrderedDict
from typing import Any, Literal

import msgspec

from myelin.records import AuditRecord

Action = Literal["serve", "promote", "backfill", "pii_read", "serve_view", "retention", "erasure"]
ACTIONS: tuple[str, ...] = typing.get_args(Action)


class DecisionRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    action: Action
    subject: str
    input: dict[str, Any]
    trace_id: str = ""


class Decision(msgspec.Struct, frozen=True):
    decision_id: str
    action: str
    subject: str
    allow: bool
    reasons: list[str]
    policy_version: str
    cached: bool


class PolicyResult(msgspec.Struct, frozen=True):
    """What a policy package document must contain."""

    allow: bool = False
    reasons: list[str] = []


def canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def policy_version(sources: dict[str, str]) -> str:
    """Content hash of every policy file, so each decision names the exact rules used."""
    h = hashlib.sha256()
    for name in sorted(sources):
        h.update(name.encode() + b"\0" + sources[name].encode() + b"\0")
    return h.hexdigest()[:16]


def cache_key(req: DecisionRequest, version: str) -> str:
    return hashlib.sha256(f"{version}\0{req.action}\0{canonical(req.input)}".encode()).hexdigest()


def interpret(document: Any) -> PolicyResult:
    """A package document -> allow / reasons. A missing or odd document denies."""
    if not isinstance(document, dict):
        return PolicyResult(False, ["policy returned no decision document"])
    allow = document.get("allow") is True
    raw = document.get("reasons", [])
    reasons = sorted(str(r) for r in raw) if isinstance(raw, list) else []
    if not allow and not reasons:
        reasons = ["denied by default"]
    return PolicyResult(allow, reasons)


class TTLCache:
    """A small LRU with expiry for decisions."""

    def __init__(self, ttl_s: float, max_items: int = 10_000) -> None:
        self.ttl_s = ttl_s
        self.max_items = max_items
        self._items: OrderedDict[str, tuple[float, PolicyResult]] = OrderedDict()

    def get(self, key: str, now: float) -> PolicyResult | None:
        item = self._items.get(key)
        if item is None:
            return None
        if now - item[0] > self.ttl_s:
            del self._items[key]
            return None
        self._items.move_to_end(key)
        return item[1]

    def put(self, key: str, value: PolicyResult, now: float) -> None:
        self._items[key] = (now, value)
        self._items.move_to_end(key)
        while len(self._items) > self.max_items:
            self._items.popitem(last=False)


def audit_record(decision: Decision, req: DecisionRequest) -> AuditRecord:
    return AuditRecord(
        decision_id=decision.decision_id,
        ts_ms=int(time.time() * 1000),
        action=decision.action,
        subject=decision.subject,
        allow=decision.allow,
        reasons=decision.reasons,
        policy_version=decision.policy_version,
        input_json=canonical(req.input),
        trace_id=req.trace_id,
        cached=decision.cached,
    )
