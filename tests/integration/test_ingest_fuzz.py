"""Property-based: whatever arrives over HTTP, ingest answers with a specific 4xx or a
per-event outcome, never half-applies a refused batch, and keeps serving."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import aiohttp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nats.aio.client import Client as NATS

from myelin.settings import Settings
from services.ingest.app import IngestApp

pytestmark = pytest.mark.integration

values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
    max_leaves=12,
)


def event(i: int) -> dict[str, Any]:
    return {
        "event_id": f"ok-{i}",
        "type": "click",
        "schema_version": 1,
        "event_time": int(time.time() * 1000),
        "data": {"user_id": "u", "item_id": "i"},
    }


bodies = st.one_of(
    st.binary(max_size=200),
    st.lists(values, max_size=4).map(lambda v: json.dumps(v).encode()),
    st.lists(
        st.fixed_dictionaries(
            {
                "event_id": st.text(max_size=5),
                "type": st.sampled_from(["click", "x"]),
                "schema_version": st.integers(-1, 3),
                "event_time": st.integers(),
                "data": values,
            }
        ),
        max_size=4,
    ).map(lambda v: json.dumps(v).encode()),
)


async def test_random_input_never_breaks_the_service(nc: NATS, settings: Settings) -> None:
    app = IngestApp(settings)
    await app.start()
    url = f"http://127.0.0.1:{settings.ingest_http_port}/v1/events"
    seen: list[int] = []
    try:
        async with aiohttp.ClientSession() as http:
            loop = asyncio.get_running_loop()

            @settings_for_fuzz
            @given(body=bodies)
            def probe(body: bytes) -> None:
                async def go() -> None:
                    async with http.post(
                        url, data=body, headers={"Content-Type": "application/json"}
                    ) as r:
                        payload = await r.json()
                        seen.append(r.status)
                        assert r.status in (200, 207, 400, 413, 422), (r.status, payload)
                        if r.status in (400, 413):
                            assert payload["error"] in (
                                "malformed_json",
                                "not_a_batch",
                                "batch_too_large",
                                "too_many_events",
                            )
                        else:
                            assert (
                                len(payload["statuses"])
                                == payload["accepted"]
                                + payload["duplicates"]
                                + payload["rejected"]
                                + payload["retry"]
                            )

                asyncio.run_coroutine_threadsafe(go(), loop).result(timeout=10)

            await asyncio.to_thread(probe)
            async with http.post(url, json=[event(1), event(2)]) as r:  # still serving
                assert r.status == 200 and (await r.json())["accepted"] == 2
    finally:
        await app.stop()
    assert 400 in seen and 422 in seen


settings_for_fuzz = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
