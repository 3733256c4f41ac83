"""Inbound adapter: the HTTP batch endpoint (aiohttp).

``POST /v1/events`` with a JSON array of events (``?mode=per_event`` stores one JetStream
message per event, with the event id as ``Nats-Msg-Id``; the default packs events into
messages by type and partition). Answers:
200 all stored (or duplicates) · 207 some rejected · 422 all rejected ·
400 malformed body · 413 too large · 415 wrong content type ·
429 overloaded (``Retry-After``; retry the same batch, ids make it idempotent).
"""

from __future__ import annotations

import math

import msgspec
from aiohttp import web

from myelin import slis, telemetry
from myelin.errors import Overloaded
from services.ingest.ingestor import Ingestor
from services.ingest.logic import BatchRefused

_json = msgspec.json.Encoder()
INGESTOR = web.AppKey("ingestor", Ingestor)


def _reply(status: int, body: object, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        status=status, body=_json.encode(body), content_type="application/json", headers=headers
    )


async def post_events(request: web.Request) -> web.Response:
    with slis.timed("ingest_http") as sli:
        resp = await _post_events(request)
        sli["outcome"] = slis.outcome_of_status(resp.status)
        return resp


async def _post_events(request: web.Request) -> web.Response:
    ingestor = request.app[INGESTOR]
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
            result = await ingestor.ingest(body, per_event=request.query.get("mode") == "per_event")
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


def build_app(ingestor: Ingestor) -> web.Application:
    app = web.Application(client_max_size=ingestor.limits.max_batch_bytes + 1)
    app[INGESTOR] = ingestor
    app.router.add_post("/v1/events", post_events)
    app.router.add_get("/healthz", get_health)
    return app
