"""Readiness of the inference service on real engines: models loaded and warmed at start,
governance-denied alias targets, Redis outages, and the promote policy's serving rules."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import grpc
import msgspec
import pytest
import redis.asyncio as aioredis
from grpc_health.v1 import health_pb2, health_pb2_grpc
from nats.aio.client import Client as NATS

from myelin import bus
from myelin.gen import grpc_predict_v2_pb2 as oip
from myelin.gen import grpc_predict_v2_pb2_grpc as oip_grpc
from myelin.gen import myelin_predict_pb2 as mp
from myelin.gen import myelin_predict_pb2_grpc as mp_grpc
from myelin.models import ModelRegistry, PromotionDenied
from myelin.service import serve_health
from myelin.settings import Settings
from myelin.stack.engines import RedisServer
from myelin.stack.process import wait_port
from myelin.subjects import MODELS_BUCKET, health_subject
from services.governance.app import GovernanceApp
from services.governance.logic import policy_version
from services.governance.policy_engines import RegoEngine, load_policies
from services.inference.app import InferenceApp
from tests.helpers import register, seed_online_features, tiny_model

pytestmark = pytest.mark.integration
_mp = msgspec.msgpack.Encoder()
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@dataclass
class World:
    settings: Settings
    gov: GovernanceApp

    async def restart_governance(self, policy_dir: Path) -> None:
        await self.gov.stop()
        self.gov = GovernanceApp(replace(self.settings, policy_dir=policy_dir))
        await self.gov.start()


@pytest.fixture
async def world(nc: NATS, settings: Settings, redis_client: aioredis.Redis) -> AsyncIterator[World]:
    """Governance and online features for users u0..u4; inference is started by each test."""
    s = replace(settings, policy_cache_ttl_s=2.0)
    w = World(s, GovernanceApp(s))
    await w.gov.start()
    await seed_online_features(nc, s, redis_client, users=5, events=20)
    try:
        yield w
    finally:
        await w.gov.stop()


@contextlib.asynccontextmanager
async def inference(s: Settings) -> AsyncIterator[tuple[InferenceApp, grpc.aio.Channel]]:
    app = InferenceApp(s)
    await app.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as ch:
            yield app, ch
    finally:
        await app.stop()


async def eventually(check: Callable[[], Awaitable[bool]], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not await check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.1)


async def server_ready(ch: grpc.aio.Channel) -> bool:
    resp = await oip_grpc.GRPCInferenceServiceStub(ch).ServerReady(oip.ServerReadyRequest())
    return bool(resp.ready)


async def model_ready(ch: grpc.aio.Channel, name: str, version: str = "") -> bool:
    resp = await oip_grpc.GRPCInferenceServiceStub(ch).ModelReady(
        oip.ModelReadyRequest(name=name, version=version)
    )
    return bool(resp.ready)


async def health(ch: grpc.aio.Channel, service: str = "") -> int:
    resp = await health_pb2_grpc.HealthStub(ch).Check(
        health_pb2.HealthCheckRequest(service=service)
    )
    return int(resp.status)


async def test_ready_at_start_without_a_request(world: World, nc: NATS) -> None:
    v1 = await register(nc, world.settings, tiny_model())
    # no alias: nothing loads it until a request names it
    v2 = await register(nc, world.settings, tiny_model(seed=2), alias=None)
    async with inference(world.settings) as (app, ch):
        assert await server_ready(ch)
        for service in ("", "inference.GRPCInferenceService", "myelin.predict.v1.Predictor"):
            assert await health(ch, service) == SERVING
        assert await model_ready(ch, "ctr") and await model_ready(ch, "ctr", str(v1))
        assert await model_ready(ch, "ctr", "champion")
        # ModelReady answers from memory: a version nobody asked for stays unloaded
        assert not await model_ready(ch, "ctr", str(v2))
        assert not await model_ready(ch, "nope")
        status = app.status()
        assert status["ready"] is True and status["not_ready"] == []
        assert status["models"] == [f"ctr:v{v1}"] and status["requests"] == 0

        # loaded and warmed: the first request costs about what a warm one does
        stub = mp_grpc.PredictorStub(ch)
        req = mp.PredictRequest(model_name="ctr", entity_ids=["u0", "u1"])
        t0 = time.perf_counter()
        first = await stub.Predict(req)
        first_s = time.perf_counter() - t0
        warm = []
        for _ in range(15):
            t0 = time.perf_counter()
            await stub.Predict(req)
            warm.append(time.perf_counter() - t0)
        assert first.model_version == str(v1)
        # (a lazy load made the first one ~20x slower: ~30 ms against ~1.5 ms)
        assert first_s < 2 * max(warm) + 0.01, (first_s, warm)


async def test_a_model_promoted_while_running_is_loaded_before_traffic(
    world: World, nc: NATS
) -> None:
    async with inference(world.settings) as (app, ch):
        assert await server_ready(ch)  # no model is known: nothing to wait for
        v1 = await register(nc, world.settings, tiny_model())

        async def loaded() -> bool:
            return bool(app.status()["models"])

        await eventually(loaded, timeout_s=5)
        await eventually(lambda: server_ready(ch), timeout_s=5)
        assert app.status()["models"] == [f"ctr:v{v1}"] and app.status()["requests"] == 0
        assert await model_ready(ch, "ctr")


async def test_promotion_to_a_version_serving_denies_is_refused(world: World, nc: NATS) -> None:
    v1 = await register(nc, world.settings, tiny_model())
    trained = tiny_model(seed=1)
    weak = await register(
        nc, world.settings, replace(trained, metrics={**trained.metrics, "auc": 0.489}), alias=None
    )
    blocked = await register(nc, world.settings, trained, alias=None, labels={"blocked": "true"})
    js = bus.jetstream(nc, world.settings)
    reg = ModelRegistry(nc, js)
    with pytest.raises(PromotionDenied) as err:
        await reg.set_alias("ctr", "challenger", weak, requester="test")
    assert err.value.message == (
        f"promoting ctr v{weak} to challenger was denied: "
        "validation AUC 0.489 is below the serving floor 0.55"
    )
    with pytest.raises(PromotionDenied, match="model is labelled blocked"):
        await reg.set_alias("ctr", "shadow", blocked, requester="test")
    with pytest.raises(PromotionDenied, match="model is labelled blocked"):
        await reg.set_alias("ctr", "champion", blocked, requester="test")
    assert await reg.aliases("ctr") == {"champion": v1}
    entry = await (await js.key_value(MODELS_BUCKET)).get("ctr.aliases")
    assert msgspec.json.decode(entry.value or b"") == {"champion": v1}


async def test_alias_moved_around_governance_is_not_followed(world: World, nc: NATS) -> None:
    v1 = await register(nc, world.settings, tiny_model())
    blocked = await register(
        nc, world.settings, tiny_model(seed=1), alias=None, labels={"blocked": "true"}
    )
    kv = await bus.jetstream(nc, world.settings).key_value(MODELS_BUCKET)
    async with inference(world.settings) as (app, ch):
        health_sub = await serve_health(nc, app)  # what `myelin status` reads
        try:
            stub = mp_grpc.PredictorStub(ch)
            req = mp.PredictRequest(model_name="ctr", entity_ids=["u0"])
            assert (await stub.Predict(req)).model_version == str(v1)
            assert await server_ready(ch)
            # written straight into the registry, without asking governance
            await kv.put("ctr.aliases", msgspec.json.encode({"champion": blocked}))
            reason = f"ctr:champion -> v{blocked} denied by governance: model is labelled blocked"

            async def reported() -> bool:
                return reason in app.status()["not_ready"]

            await eventually(reported, timeout_s=5)
            assert app.status()["ready"] is False
            assert not await server_ready(ch) and await health(ch) == NOT_SERVING
            h = msgspec.json.decode(await bus.request(nc, health_subject("inference"), {}))
            assert h["ready"] is False and reason in h["not_ready"]
            # the previous, allowed version keeps serving the alias
            resp = await stub.Predict(req)
            assert resp.model_version == str(v1) and resp.alias == "champion"
            assert await model_ready(ch, "ctr") and not await model_ready(ch, "ctr", str(blocked))
            assert app.status()["aliases"] == {"ctr": {"champion": v1}}

            # the registry put right again: ready again
            await kv.put("ctr.aliases", msgspec.json.encode({"champion": v1}))
            await eventually(lambda: server_ready(ch), timeout_s=5)
            assert await health(ch) == SERVING and app.status()["not_ready"] == []
        finally:
            await health_sub.unsubscribe()


async def test_a_serving_version_governance_turns_down_is_not_ready(
    world: World, nc: NATS, tmp_path: Path
) -> None:
    v1 = await register(nc, world.settings, tiny_model())
    async with inference(world.settings) as (app, ch):
        stub = mp_grpc.PredictorStub(ch)
        req = mp.PredictRequest(model_name="ctr", entity_ids=["u0"])
        assert (await stub.Predict(req)).model_version == str(v1)
        assert await server_ready(ch)
        # the policies change under a running server: no AUC clears the new floor
        strict = tmp_path / "strict-policies"
        shutil.copytree(world.settings.policy_dir, strict)
        serve = strict / "serve.rego"
        serve.write_text(serve.read_text().replace("auc_floor := 0.55", "auc_floor := 1.01"))
        await world.restart_governance(strict)
        prefix = f"ctr:champion -> v{v1} denied by governance: validation AUC "

        async def reported() -> bool:
            return any(r.startswith(prefix) for r in app.status()["not_ready"])

        await eventually(reported, timeout_s=10)  # re-decided within policy_cache_ttl_s
        assert not await server_ready(ch) and await health(ch) == NOT_SERVING
        assert not await model_ready(ch, "ctr") and not await model_ready(ch, "ctr", str(v1))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Predict(req)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "below the serving floor 1.01" in (err.value.details() or "")


async def watch_until(watch: Any, status: int, timeout_s: float) -> None:
    """Read a grpc.health.v1 Watch stream until it reports ``status``."""
    async with asyncio.timeout(timeout_s):
        while (await watch.read()).status != status:
            pass


async def test_redis_outage_flips_readiness(
    world: World, nc: NATS, redis_server: RedisServer
) -> None:
    await register(nc, world.settings, tiny_model())
    async with inference(world.settings) as (app, ch):
        await mp_grpc.PredictorStub(ch).Predict(
            mp.PredictRequest(model_name="ctr", entity_ids=["u0"])
        )
        assert await server_ready(ch)
        watch = health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(service=""))
        restarted: asyncio.subprocess.Process | None = None
        try:
            await watch_until(watch, SERVING, 5)
            await redis_server.stop()
            await watch_until(watch, NOT_SERVING, 5)
            assert not await server_ready(ch) and await health(ch) == NOT_SERVING
            assert any(r.startswith("redis unreachable: ") for r in app.status()["not_ready"])
            assert await model_ready(ch, "ctr")  # the model itself is fine
            # Started without RedisServer.start: its pre-exec hook runs Python in the forked
            # child, which can crash while this process's gRPC threads are busy.
            restarted = await asyncio.create_subprocess_exec(
                *redis_server.argv,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL,
            )
            await wait_port(redis_server.host, redis_server.port, 20)
            await watch_until(watch, SERVING, 10)
            assert await server_ready(ch) and app.status()["ready"] is True
        finally:
            watch.cancel()
            if restarted is not None:
                restarted.terminate()
                await restarted.wait()


@pytest.mark.parametrize(
    ("model", "serve_reason"),
    [
        (
            {
                "provenance": {"training_window": [1, 2], "feature_views": ["v@h"]},
                "metrics": {"auc": 0.489},
                "labels": {},
            },
            "validation AUC 0.489 is below the serving floor 0.55",
        ),
        (
            {
                "provenance": {"training_window": [1, 2], "feature_views": ["v@h"]},
                "metrics": {"auc": 0.9},
                "labels": {"blocked": "true"},
            },
            "model is labelled blocked",
        ),
        (
            {"provenance": {}, "metrics": {"auc": 0.9}, "labels": {}},
            "model has no provenance: training_window is missing",
        ),
        (
            {
                "provenance": {"training_window": [1, 2], "feature_views": ["v@h"]},
                "metrics": {"auc": 0.9},
                "labels": {},
            },
            None,
        ),
    ],
)
async def test_promote_policy_denies_what_serve_denies(
    settings: Settings, model: dict[str, object], serve_reason: str | None
) -> None:
    sources = load_policies(settings.policy_dir)
    engine = RegoEngine(sources, policy_version(sources))
    serve = await engine.evaluate("myelin.serve", {"model": model})
    assert serve["allow"] is (serve_reason is None)
    for alias in ("champion", "challenger", "shadow"):
        promote = await engine.evaluate(
            "myelin.promote", {"alias": alias, "requester": "t", "model": model}
        )
        assert set(serve["reasons"]) <= set(promote["reasons"])
        assert promote["allow"] is (serve_reason is None)
        if serve_reason:
            assert serve_reason in promote["reasons"]
