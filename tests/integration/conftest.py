"""Fixtures of the integration tests that need a serving stack."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace

import pytest
import redis.asyncio as aioredis
from nats.aio.client import Client as NATS

from myelin.settings import Settings
from services.governance.app import GovernanceApp
from services.inference.app import InferenceApp
from tests.helpers import seed_online_features

USERS = 60  # with online features: u0 .. u59


@pytest.fixture
async def serving(
    nc: NATS, settings: Settings, redis_client: aioredis.Redis
) -> AsyncIterator[tuple[Settings, InferenceApp]]:
    s = replace(settings, policy_cache_ttl_s=2.0, drift_window_s=3600.0)  # windows on demand
    gov = GovernanceApp(s)
    await gov.start()
    await seed_online_features(nc, s, redis_client, users=USERS, events=8 * USERS)
    inf = InferenceApp(s)
    await inf.start()
    try:
        yield replace(s, inference_grpc_port=inf.port), inf
    finally:
        await inf.stop()
        await gov.stop()
