"""Inbound adapter: the HTTP batch endpoint (aiohttp).

``POST /v1/events`` with a JSON array of events (``?mode=per_event`` stores one JetStream
message per event, with the event id as ``Nats-Msg-Id``; the default packs events into
messages by type and partition). Answers:
200 all stored (or duplicates) · 207 some rejected · 422 all rejected ·
400 malformed body · 401 no or unknown bearer token · 403 an identity that may not send
events · 413 too large · 415 wrong content type ·
429 overloaded (``Retry-After``; retry the same batch, ids make it idempotent).

With ``MYELIN_API_TOKENS_FILE`` set (``myelin up`` sets it) every request needs
``Authorization: Bearer <token>``; the token's identity is the producer stamped on every
event (an envelope's ``producer_id`` is not taken on trust), and each refusal is audited.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable

import msgspec
from aiohttp import web

from myelin import access, slis, telemetry
from myelin.api_tokens import TokenBook, dev_token_file
from myelin.errors import Overloaded
from myelin.settings import Settings
from myelin.subjects import RPC_INGEST_PUBLISH
from services.ingest.ingestor import Ingestor
from services.ingest.logic import BatchRefused

_json = msgspec.json.Encoder()
INGESTOR = web.AppKey("ingestor", Ingestor)
# who sent it: a bearer token's identity (None: the door takes every caller), and where
# a refusal is put on the record (action, caller, reason)
TOKENS = web.AppKey("tokens", TokenBook)
Refusal = Callable[[str, str, str], Awaitable[None]]
AUDIT_REFUSAL: web.AppKey[Refusal] = web.AppKey("audit_refusal")
DOOR = "POST /v1/events"


def _reply(status: int, body: object, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        status=status, body=_json.encode(body), content_type="application/json", headers=headers
    )


async def post_events(request: web.Request) -> web.Response:
    with slis.timed("ingest_http") as sli:
        resp = await _post_events(request)
        sli["outcome"] = slis.outcome_of_status(resp.status)
        return resp


async def _identify(request: web.Request) -> str | web.Response:
    """The authenticated producer ('' when the door takes every caller), or the refusal."""
    book = request.app.get(TOKENS)
    if book is None:
        return ""
    who = book.identify(request.headers.get("Authorization"))
    refuse = request.app[AUDIT_REFUSAL]
    if who is None:
        said = "no" if "Authorization" not in request.headers else "an unknown"
        reason = f"{said} bearer token at {DOOR}"
        await refuse(access.UNAUTHENTICATED_ACTION, "", reason)
        return _reply(
            401,
            {
                "error": "unauthenticated",
                "message": f"{reason}: send 'Authorization: Bearer <token>' with a producer's "
                f"token (myelin up writes one to {dev_token_file_hint()})",
            },
            {"WWW-Authenticate": 'Bearer realm="myelin"'},
        )
    if not access.may_call(who, RPC_INGEST_PUBLISH):
        reason = f"identity {who!r} may not send events (only producers and the operator)"
        await refuse(access.FORBIDDEN_ACTION, who, reason)
        return _reply(403, {"error": "forbidden", "message": reason})
    return who


def dev_token_file_hint() -> str:
    return str(dev_token_file(Settings(), "producer"))


async def _post_events(request: web.Request) -> web.Response:
    ingestor = request.app[INGESTOR]
    producer = await _identify(request)
    if isinstance(producer, web.Response):
        return producer
    ctype = request.content_type
    if ctype not in ("application/json", "application/octet-stream", ""):
        return _reply(
            415,
            {"error": "unsupported_media_type", "message": f"send application/json, not {ctype}"},
        )
    ctx = telemetry.extract(dict(request.headers))
    with telemetry.tracer("myelin.ingest").start_as_current_span("POST /v1/events", context=ctx):
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return _reply(
                413,
                {
                    "error": "batch_too_large",
                    "message": f"the limit is {ingestor.limits.max_batch_bytes} bytes",
                },
            )
        try:
            result = await ingestor.ingest(
                body, per_event=request.query.get("mode") == "per_event", producer=producer
            )
        except BatchRefused as refused:
            return _reply(
                refused.status, {"error": refused.reason.value, "message": refused.message}
            )
        except Overloaded as exc:
            return _reply(
                429,
                {"error": "overloaded", "message": exc.message, "retry_after_s": exc.retry_after},
                {"Retry-After": str(math.ceil(exc.retry_after))},
            )
    if result.retry:
        return _reply(429, result, {"Retry-After": str(math.ceil(result.retry_after_s or 1))})
    if result.rejected and not (result.accepted or result.duplicates):
        return _reply(422, result)
    if result.rejected:
        return _reply(207, result)
    return _reply(200, result)


async def get_health(request: web.Request) -> web.Response:
    return _reply(200, {"status": "ok", **request.app[INGESTOR].status()})


def build_app(
    ingestor: Ingestor, tokens: TokenBook | None = None, audit_refusal: Refusal | None = None
) -> web.Application:
    """``tokens``: the producers' bearer tokens (``None``: no authentication); a refused
    request is put on the record by ``audit_refusal``."""
    app = web.Application(client_max_size=ingestor.limits.max_batch_bytes + 1)
    app[INGESTOR] = ingestor
    if tokens is not None:
        if audit_refusal is None:
            raise ValueError("a door with authentication needs somewhere to record refusals")
        app[TOKENS] = tokens
        app[AUDIT_REFUSAL] = audit_refusal
    app.router.add_post("/v1/events", post_events)
    app.router.add_get("/healthz", get_health)
    return app
