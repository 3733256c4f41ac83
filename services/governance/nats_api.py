"""Inbound adapter: decisions over NATS request-reply."""

from __future__ import annotations

from typing import Any

import msgspec
from nats.aio.client import Client as NATS

from myelin import bus, slis
from myelin.subjects import RPC_GOVERNANCE_DECIDE
from services.governance.decider import Decider
from services.governance.logic import DecisionRequest

_decode = msgspec.json.Decoder(DecisionRequest)


async def serve_decisions(nc: NATS, decider: Decider) -> Any:
    async def handle(data: bytes, _headers: dict[str, str]) -> Any:
        with slis.timed("governance_decide"):
            req = bus.decode_request(_decode, data, "decision")
            return await decider.decide(req)

    return await bus.serve(nc, RPC_GOVERNANCE_DECIDE, handle, queue="governance", concurrency=64)
