"""The HTTP probe endpoints every service gets with MYELIN_HEALTH_HTTP_PORT (what the
Kubernetes deployments in infra/terraform wire their probes to), on a real service."""

from __future__ import annotations

import aiohttp
import pytest
from nats.aio.client import Client as NATS

from myelin.service import serve_health_http
from myelin.settings import Settings
from myelin.stack.process import free_port
from services.governance.app import GovernanceApp

pytestmark = pytest.mark.integration


async def test_readyz_follows_the_services_own_readiness(nc: NATS, settings: Settings) -> None:
    app = GovernanceApp(settings)
    port = free_port()
    probes = await serve_health_http(app, "127.0.0.1", port)
    base = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{base}/livez") as r:
                assert r.status == 200
            async with http.get(f"{base}/readyz") as r:  # policies not compiled yet
                assert r.status == 503 and (await r.json())["ready"] is False
            await app.start()
            async with http.get(f"{base}/readyz") as r:
                body = await r.json()
                assert r.status == 200 and body == {
                    "service": "governance",
                    "ready": True,
                    "not_ready": [],
                }
            async with http.post(f"{base}/readyz", data=b"\xff") as r:
                assert r.status == 405
            async with http.get(f"{base}/readyz/../../etc/passwd") as r:
                assert r.status == 404
    finally:
        await probes.cleanup()
        await app.stop()
