"""The ops service's HTTP door on a real NATS with no other service running: it reports
who does not answer instead of failing, serves only its own files, and refuses what it
does not serve."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import pytest
from nats.aio.client import Client as NATS

from myelin.settings import Settings
from services.ops.app import OpsApp

pytestmark = pytest.mark.integration


@pytest.fixture
async def ops(nc: NATS, settings: Settings) -> AsyncIterator[str]:
    app = OpsApp(settings)
    await app.start()
    try:
        yield f"http://127.0.0.1:{settings.ops_http_port}"
    finally:
        await app.stop()


async def test_the_page_and_its_data_with_every_service_down(ops: str) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{ops}/") as r:
            page = await r.text()
            assert r.status == 200 and "uPlot.iife.min.js" in page and 'id="latency"' in page
        async with http.get(f"{ops}/static/uPlot.iife.min.js") as r:
            assert r.status == 200 and len(await r.read()) > 10_000
        for _ in range(50):  # the first round of health requests
            async with http.get(f"{ops}/api/series") as r:
                series = await r.json()
            if series["unreachable"]:
                break
            await asyncio.sleep(0.1)
        assert {"governance", "warehouse", "features", "ingest"} <= set(series["unreachable"])
        assert series["health"] == {}
        async with http.get(f"{ops}/api/recent") as r:
            recent = await r.json()
        assert r.status == 200 and recent["dead_letters"] == []


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/static/../app.py", 404),
        ("GET", "/static/%2e%2e/app.py", 404),
        ("GET", "/nope", 404),
        ("POST", "/api/series", 405),
        ("PUT", "/", 405),
        ("GET", "/static/", 403),
    ],
)
async def test_only_its_own_files_and_methods(
    ops: str, method: str, path: str, status: int
) -> None:
    async with (
        aiohttp.ClientSession() as http,
        http.request(method, f"{ops}{path}", data=b"\xff\x00junk") as r,
    ):
        assert r.status == status, await r.text()
