"""The live ops page in headless Chromium (Debian's package) while events flow through the
whole platform (`Stack`, every service a process): the page loads, its uPlot charts have
data (throughput, lag, freshness, latency, dead-letter and late rates, governance), the
tables show the recent dead letters and denials with their reasons, and a screenshot is
saved (``MYELIN_OPS_SCREENSHOT=path`` keeps a copy: docs/ops-page.png was made so).

Chromium is not a Python package: ``.ci/run`` installs it. Without it this test is skipped,
unless ``MYELIN_REQUIRE_BROWSER=1`` (set by ``.ci/run``) makes that a failure."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from myelin import bus, grpc_client
from myelin.api_tokens import client_headers
from myelin.gen import myelin_predict_pb2 as mp
from myelin.gen import myelin_predict_pb2_grpc as mp_grpc
from myelin.models import PromotionDenied
from myelin.settings import Settings
from myelin.stack.supervisor import Stack
from tests.helpers import clickstream, register, tiny_model

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        not CHROMIUM and os.environ.get("MYELIN_REQUIRE_BROWSER") != "1",
        reason="needs Debian's chromium package (apt-get install chromium)",
    ),
]
CHARTS = ("throughput", "lag", "freshness", "latency", "errors", "governance")


def chromium(*args: str, profile: Path) -> str:
    assert CHROMIUM, "MYELIN_REQUIRE_BROWSER=1 but no chromium on PATH (apt-get install chromium)"
    argv = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        "--window-size=1400,1250",
        *args,
    ]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


async def traffic(settings: Settings, stop: asyncio.Event) -> int:
    """Events every 100 ms (some invalid, for dead letters) and a Predict each round."""
    url = f"http://127.0.0.1:{settings.ingest_http_port}/v1/events"
    sent = 0
    async with (
        aiohttp.ClientSession(headers=client_headers(settings)) as http,
        grpc_client.channel(settings) as ch,
    ):
        stub = mp_grpc.PredictorStub(ch)
        k = 0
        while not stop.is_set():
            now = int(time.time() * 1000)
            batch: list[dict[str, Any]] = clickstream(
                200, prefix=f"p{k}-", now_ms=now, users=50, items=20, ago_ms=2000, step_ms=10
            )
            bad = {"event_id": f"bad{k}", "type": "click", "schema_version": 1, "event_time": now}
            batch.append({**bad, "data": {"item_id": "no user"}})  # an invalid payload
            async with http.post(url, json=batch) as r:
                assert r.status in (200, 207, 429), await r.text()
            sent += len(batch)
            await stub.Predict(mp.PredictRequest(model_name="ctr", entity_ids=["u1", "u2"]))
            k += 1
            await asyncio.sleep(0.1)
    return sent


@pytest.mark.timeout(300)
async def test_the_ops_page_plots_live_data_in_chromium(settings: Settings, tmp_path: Path) -> None:
    async with Stack(settings, log=lambda _m: None):
        nc = await bus.connect(settings, "test")
        try:
            await register(nc, settings, tiny_model())
            with pytest.raises(PromotionDenied):  # a denial, with its reason, for the page
                await register(nc, settings, tiny_model(seed=1), labels={"blocked": "true"})
        finally:
            await nc.close()
        stop = asyncio.Event()
        flow = asyncio.create_task(traffic(settings, stop))
        try:
            await asyncio.sleep(12)  # points on every chart; the warehouse drains its tables
            page = f"http://127.0.0.1:{settings.ops_http_port}/"
            dom = await asyncio.to_thread(
                chromium, "--virtual-time-budget=4000", "--dump-dom", page, profile=tmp_path / "a"
            )
            shot = tmp_path / "ops-page.png"
            await asyncio.to_thread(
                chromium,
                "--virtual-time-budget=4000",
                "--hide-scrollbars",
                f"--screenshot={shot}",
                page,
                profile=tmp_path / "b",
            )
        finally:
            stop.set()
            assert await flow > 0

    updates = re.search(r'<body data-updates="(\d+)"', dom)
    assert updates and int(updates.group(1)) >= 1, dom[:2000]
    for chart in CHARTS:
        m = re.search(rf'id="{chart}"[^>]*data-points="(\d+)"', dom) or re.search(
            rf'data-points="(\d+)"[^>]*id="{chart}"', dom
        )
        assert m and int(m.group(1)) > 0, f"chart {chart} has no data"
    assert dom.count("<canvas") >= len(CHARTS)  # drawn by uPlot
    for table, reason in (("dead_letters", "invalid_payload"), ("denials", "labelled blocked")):
        m = re.search(rf'id="{table}"[^>]*data-rows="(\d+)"', dom) or re.search(
            rf'data-rows="(\d+)"[^>]*id="{table}"', dom
        )
        assert m and int(m.group(1)) >= 1, f"no rows in {table}"
        assert reason in dom, f"{reason!r} not shown"
    assert shot.stat().st_size > 20_000 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if keep := os.environ.get("MYELIN_OPS_SCREENSHOT"):
        shutil.copyfile(shot, keep)
