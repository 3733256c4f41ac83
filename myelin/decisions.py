"""A client for governance decisions over NATS request-reply (shared: inference asks before
serving, features before a replay, the CLI before promoting)."""

from __future__ import annotations

from typing import Any

import msgspec
from nats.aio.client import Client as NATS

from myelin import bus, telemetry
from myelin.subjects import RPC_GOVERNANCE_DECIDE


class Verdict(msgspec.Struct, frozen=True):
    decision_id: str
    allow: bool
    reasons: list[str]
    policy_version: str
    cached: bool = False


_dec = msgspec.json.Decoder(Verdict)


class GovernanceClient:
    def __init__(self, nc: NATS, timeout_s: float = 3.0) -> None:
        self._nc = nc
        self._timeout = timeout_s

    async def decide(self, action: str, subject: str, input_doc: dict[str, Any]) -> Verdict:
        raw = await bus.request(
            self._nc,
            RPC_GOVERNANCE_DECIDE,
            {
                "action": action,
                "subject": subject,
                "input": input_doc,
                "trace_id": telemetry.trace_id_hex(),
            },
            timeout=self._timeout,
        )
        return _dec.decode(raw)
