"""Inbound adapter: decisions, and the registry owner's moves of what serves, over NATS
request-reply."""

from __future__ import annotations

from typing import Any

import msgspec
from nats.aio.client import Client as NATS

from myelin import bus, slis
from myelin.subjects import (
    RPC_GOVERNANCE_DECIDE,
    RPC_GOVERNANCE_ERASE,
    RPC_GOVERNANCE_PROMOTE,
    RPC_GOVERNANCE_ROLLBACK,
    RPC_GOVERNANCE_ROUTES,
)
from services.governance.decider import Decider
from services.governance.erasure import Eraser, EraseRequest
from services.governance.logic import DecisionRequest
from services.governance.serving_owner import (
    PromoteRequest,
    RollbackRequest,
    RoutesRequest,
    ServingOwner,
)

_decode = msgspec.json.Decoder(DecisionRequest)
_promote = msgspec.json.Decoder(PromoteRequest)
_routes = msgspec.json.Decoder(RoutesRequest)
_rollback = msgspec.json.Decoder(RollbackRequest)


async def serve_decisions(nc: NATS, decider: Decider) -> Any:
    async def handle(data: bytes, headers: dict[str, str]) -> Any:
        with slis.timed("governance_decide"):
            req = bus.decode_request(_decode, data, "decision")
            # who asked, as the server authenticated it, beside what the input says
            req.input["caller"] = headers.get(bus.CALLER, "")
            return await decider.decide(req)

    return await bus.serve(nc, RPC_GOVERNANCE_DECIDE, handle, queue="governance", concurrency=64)


async def serve_erasure(nc: NATS, eraser: Eraser) -> Any:
    decode = msgspec.json.Decoder(EraseRequest)

    async def erase(data: bytes, headers: dict[str, str]) -> Any:
        return await eraser.erase(
            bus.decode_request(decode, data, "erasure"), headers.get(bus.CALLER, "")
        )

    return await bus.serve(nc, RPC_GOVERNANCE_ERASE, erase, queue="governance", concurrency=4)


async def serve_registry_owner(nc: NATS, owner: ServingOwner) -> list[Any]:
    async def promote(data: bytes, headers: dict[str, str]) -> Any:
        req = bus.decode_request(_promote, data, "promote")
        await owner.set_alias(req, headers.get(bus.CALLER, ""))
        return {"name": req.name, "alias": req.alias, "version": req.version}

    async def routes(data: bytes, headers: dict[str, str]) -> Any:
        return await owner.set_routes(
            bus.decode_request(_routes, data, "routes"), headers.get(bus.CALLER, "")
        )

    async def rollback(data: bytes, headers: dict[str, str]) -> Any:
        return await owner.rollback(
            bus.decode_request(_rollback, data, "rollback"), headers.get(bus.CALLER, "")
        )

    # a queue group: several governance replicas answer one each; the writes are
    # compare-and-set, so two moves at once cannot lose one
    return [
        await bus.serve(nc, RPC_GOVERNANCE_PROMOTE, promote, queue="governance", concurrency=8),
        await bus.serve(nc, RPC_GOVERNANCE_ROUTES, routes, queue="governance", concurrency=8),
        await bus.serve(nc, RPC_GOVERNANCE_ROLLBACK, rollback, queue="governance", concurrency=8),
    ]
