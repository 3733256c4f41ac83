"""Inbound adapter: the ops page over HTTP (aiohttp): the page and its static files
(uPlot, vendored: no network needed), ``/api/series`` (the time series, each service's
last health reply) and ``/api/recent`` (recent dead letters and denials)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec
from aiohttp import web

from services.ops.collector import Collector

STATIC = Path(__file__).parent / "static"
_json = msgspec.json.Encoder()
_SUMMARY_KEYS = ("ready", "not_ready", "uptime_s")


def _reply(body: Any) -> web.Response:
    return web.Response(
        body=_json.encode(body),
        content_type="application/json",
        headers={"Cache-Control": "no-store"},
    )


def ops_app(collector: Collector) -> web.Application:
    async def index(_request: web.Request) -> web.FileResponse:
        return web.FileResponse(STATIC / "index.html")

    async def series(_request: web.Request) -> web.Response:
        health = {
            name: {k: h.get(k) for k in _SUMMARY_KEYS} for name, h in collector.health.items()
        }
        return _reply(
            {**collector.series.to_json(), "health": health, "unreachable": collector.unreachable}
        )

    async def recent(_request: web.Request) -> web.Response:
        return _reply(
            {
                "dead_letters": collector.dead_letters,
                "denials": collector.denials,
                "error": collector.recent_error,
            }
        )

    app = web.Application()
    app.router.add_get("/", index)
    app.router.add_get("/api/series", series)
    app.router.add_get("/api/recent", recent)
    app.router.add_static("/static/", STATIC, show_index=False)
    return app
