"""Inbound adapters: the features service's request-reply endpoints over NATS."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import msgspec
import pyarrow as pa
from nats.aio.client import Client as NATS

from myelin import access, bus, sql_client
from myelin.subject_keys import erase_request_subject
from myelin.subjects import (
    RPC_FEATURES_CHECK,
    RPC_FEATURES_ERASE,
    RPC_FEATURES_REPLAY,
    RPC_FEATURES_VIEWS,
)
from services.features.consistency import CheckRequest, check
from services.features.erasure import erase_entity
from services.features.replay import Replayer, ReplayRequest

if TYPE_CHECKING:
    from services.features.app import FeaturesApp


QUEUE = "features"  # one worker answers each request, whichever


class ViewsRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    op: Literal["list", "register", "promote", "retire"] = "list"
    view: str = ""  # NAME@HASH for promote / retire
    requester: str = ""
    definition: dict[str, Any] = {}  # for register


async def serve_replay(nc: NATS, replayer: Replayer) -> Any:
    """Start a replay (``myelin features replay``); progress is in the status."""
    decode = msgspec.json.Decoder(ReplayRequest)

    async def handle(data: bytes, headers: dict[str, str]) -> dict[str, Any]:
        req = bus.decode_request(decode, data, "replay")
        who = access.requester(headers.get(bus.CALLER, ""), req.requester)
        await replayer.start(msgspec.structs.replace(req, requester=who))
        return replayer.snapshot()

    return await bus.serve(nc, RPC_FEATURES_REPLAY, handle, queue=QUEUE)


async def serve_check(nc: NATS, app: FeaturesApp) -> Any:
    """The online/offline consistency check (``myelin features check``)."""
    decode = msgspec.json.Decoder(CheckRequest)

    async def handle(data: bytes, _headers: dict[str, str]) -> dict[str, Any]:
        req = bus.decode_request(decode, data, "check")
        assert app.reader is not None and app.views is not None
        runner = await app.views.runner_for(req.view)

        async def query(sql: str) -> pa.Table:
            return await sql_client.query(nc, sql)

        async def stored(stream_seq: int) -> None:
            await sql_client.wait_stored(nc, events_seq=stream_seq, timeout=60)

        # the engine holds configuration only (no entity state): the live one is reused;
        # the registry is re-read (a contract registered a moment ago must be known)
        registry = await app.contracts.registry()
        return await check(req, runner.engine, registry, app.reader, query, stored)

    return await bus.serve(nc, RPC_FEATURES_CHECK, handle, queue=QUEUE)


async def serve_erase(nc: NATS, app: FeaturesApp) -> Any:
    """Forget a subject's online state (asked by governance's erasure)."""

    async def handle(data: bytes, _headers: dict[str, str]) -> dict[str, Any]:
        subject = erase_request_subject(data)
        assert app.redis is not None and app.view_registry is not None
        return {"deleted": await erase_entity(app.redis, app.view_registry, subject)}

    return await bus.serve(nc, RPC_FEATURES_ERASE, handle, queue=QUEUE)


# who may change views (others, e.g. the retrainer, may list them)
CHANGES_VIEWS = frozenset({access.OPERATOR, access.ADMIN})


async def serve_views(nc: NATS, app: FeaturesApp) -> Any:
    """Feature view versions (``myelin features views|register|promote|retire``)."""
    decode = msgspec.json.Decoder(ViewsRequest)
    authenticated = bus.authenticated(nc)

    async def handle(data: bytes, headers: dict[str, str]) -> dict[str, Any]:
        req = bus.decode_request(decode, data, "views")
        assert app.views is not None
        caller = headers.get(bus.CALLER, "")
        if req.op != "list" and authenticated and caller not in CHANGES_VIEWS:
            endpoint = f"{RPC_FEATURES_VIEWS} ({req.op})"
            await bus.audit_refusal(nc, caller, endpoint)
            raise bus.Forbidden(
                f"identity {caller!r} may not call {endpoint}", caller=caller, endpoint=endpoint
            )
        who = access.requester(caller, req.requester)
        if req.op == "register":
            return await app.views.register(req.definition)
        if req.op == "promote":
            return await app.views.promote(req.view, who)
        if req.op == "retire":
            return await app.views.retire(req.view, who)
        return await app.views.list()

    return await bus.serve(nc, RPC_FEATURES_VIEWS, handle, queue=QUEUE)
