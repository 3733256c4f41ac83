from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator
from dataclasses import replace

import grpc
import msgspec
import numpy as np
import onnxruntime as ort
import pytest
import redis.asyncio as aioredis
from nats.aio.client import Client as NATS

from myelin import bus
from myelin.gen import grpc_predict_v2_pb2 as oip
from myelin.gen import grpc_predict_v2_pb2_grpc as oip_grpc
from myelin.gen import myelin_predict_pb2 as mp
from myelin.gen import myelin_predict_pb2_grpc as mp_grpc
from myelin.models import ModelRegistry, PromotionDenied
from myelin.records import InferenceRecord
from myelin.settings import Settings
from myelin.subjects import INFERENCES_STREAM
from services.features.views import USER_ACTIVITY
from services.governance.app import GovernanceApp
from services.inference.app import InferenceApp
from tests.helpers import FEATURES, register, seed_online_features, tiny_model

pytestmark = pytest.mark.integration
_mp = msgspec.msgpack.Encoder()


@pytest.fixture
async def stack(
    nc: NATS, settings: Settings, redis_client: aioredis.Redis
) -> AsyncIterator[Settings]:
    s = replace(settings, policy_cache_ttl_s=2.0)
    gov = GovernanceApp(s)
    await gov.start()
    await seed_online_features(nc, s, redis_client)
    inf = InferenceApp(s)
    await inf.start()
    try:
        yield replace(s, inference_grpc_port=inf.port)
    finally:
        await inf.stop()
        await gov.stop()


async def online_matrix(redis_client: aioredis.Redis, users: list[str]) -> np.ndarray:
    from myelin.online import OnlineReader

    vecs = await OnlineReader(redis_client).read("user_activity", users, FEATURES)
    return np.nan_to_num(np.array([v.values for v in vecs], dtype=np.float32))


async def test_predict_scores_online_features_like_onnxruntime(
    stack: Settings, nc: NATS, redis_client: aioredis.Redis
) -> None:
    trained = tiny_model()
    version = await register(nc, stack, trained)
    users = ["u0", "u1", "u2", "u3", "u4", "stranger"]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{stack.inference_grpc_port}") as ch:
        resp = await mp_grpc.PredictorStub(ch).Predict(
            mp.PredictRequest(model_name="ctr", entity_ids=users, request_id="r1"),
            metadata=(("traceparent", "00-" + "cd" * 16 + "-" + "ef" * 8 + "-01"),),
        )
    expected = ort.InferenceSession(trained.onnx).run(
        None, {"input": await online_matrix(redis_client, users)}
    )[1]
    assert (
        resp.model_version == str(version) and resp.alias == "champion" and resp.request_id == "r1"
    )
    assert (
        resp.feature_view == "user_activity"
        and resp.feature_view_hash == USER_ACTIVITY.content_hash
    )
    assert [p.entity_id for p in resp.predictions] == users
    assert [p.score for p in resp.predictions] == pytest.approx(expected[:, 1].tolist(), abs=1e-6)
    assert [p.feature_status for p in resp.predictions] == ["FRESH"] * 5 + ["MISSING"]
    assert resp.predictions[0].feature_age_ms >= 0 and resp.predictions[5].feature_age_ms == -1
    assert [f.name for f in resp.predictions[0].features] == FEATURES
    assert math.isnan(resp.predictions[5].features[0].value)
    assert resp.trace_id == "cd" * 16

    js = bus.jetstream(nc, stack)
    for _ in range(100):
        if (await js.stream_info(INFERENCES_STREAM)).state.messages:
            break
        await asyncio.sleep(0.05)
    sub = await js.pull_subscribe("myelin.inferences.>", stream=INFERENCES_STREAM)
    [msg] = await sub.fetch(1, timeout=2)
    [rec] = msgspec.msgpack.decode(msg.data, type=list[InferenceRecord])
    assert (
        rec.request_id == "r1" and rec.trace_id == "cd" * 16 and rec.model_version == str(version)
    )
    assert [p.entity_id for p in rec.predictions] == users
    assert rec.predictions[0].source_trace_id  # the trace of the event behind the features


async def test_errors_map_to_status_codes(stack: Settings, nc: NATS) -> None:
    await register(nc, stack, tiny_model())
    async with grpc.aio.insecure_channel(f"127.0.0.1:{stack.inference_grpc_port}") as ch:
        stub = mp_grpc.PredictorStub(ch)
        cases = [
            (
                mp.PredictRequest(model_name="nope", entity_ids=["u0"]),
                grpc.StatusCode.NOT_FOUND,
                "no alias",
            ),
            (
                mp.PredictRequest(model_name="ctr", entity_ids=[]),
                grpc.StatusCode.INVALID_ARGUMENT,
                "empty",
            ),
            (
                mp.PredictRequest(model_name="ctr", model_version="9", entity_ids=["u0"]),
                grpc.StatusCode.NOT_FOUND,
                "no version 9",
            ),
        ]
        for req, code, text in cases:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Predict(req)
            assert err.value.code() == code and text in (err.value.details() or "")


async def test_governance_keeps_a_denied_model_out_of_service(stack: Settings, nc: NATS) -> None:
    await register(nc, stack, tiny_model())
    blocked = await register(nc, stack, tiny_model(seed=1), alias=None, labels={"blocked": "true"})
    reg = ModelRegistry(nc, bus.jetstream(nc, stack))
    with pytest.raises(PromotionDenied, match="unknown alias"):
        await reg.set_alias("ctr", "gold", blocked)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{stack.inference_grpc_port}") as ch:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await mp_grpc.PredictorStub(ch).Predict(
                mp.PredictRequest(model_name="ctr", model_version=str(blocked), entity_ids=["u0"])
            )
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "model is labelled blocked" in (err.value.details() or "")
        ready = await oip_grpc.GRPCInferenceServiceStub(ch).ModelReady(
            oip.ModelReadyRequest(name="ctr", version=str(blocked))
        )
        assert ready.ready is False


async def test_hot_swap_drops_no_request(stack: Settings, nc: NATS) -> None:
    v1 = await register(nc, stack, tiny_model())
    async with grpc.aio.insecure_channel(f"127.0.0.1:{stack.inference_grpc_port}") as ch:
        stub = mp_grpc.PredictorStub(ch)
        await stub.Predict(mp.PredictRequest(model_name="ctr", entity_ids=["u0"]))
        v2 = await register(nc, stack, tiny_model(seed=3), alias=None)
        versions: list[str] = []
        stop = asyncio.Event()

        async def hammer() -> None:
            while not stop.is_set():
                r = await stub.Predict(mp.PredictRequest(model_name="ctr", entity_ids=["u1", "u2"]))
                versions.append(r.model_version)

        tasks = [asyncio.create_task(hammer()) for _ in range(8)]
        await asyncio.sleep(0.3)
        await ModelRegistry(nc, bus.jetstream(nc, stack)).set_alias(
            "ctr", "champion", v2, requester="t"
        )
        for _ in range(100):
            if versions and versions[-1] == str(v2):
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.2)
        stop.set()
        await asyncio.gather(*tasks)  # any failed call would raise here
    assert versions[0] == str(v1) and versions[-1] == str(v2)
    switch = versions.index(str(v2))
    assert all(v == str(v2) for v in versions[switch:])


async def test_open_inference_protocol(stack: Settings, nc: NATS) -> None:
    trained = tiny_model()
    version = await register(nc, stack, trained)
    x = np.random.default_rng(1).poisson(3, (7, len(FEATURES))).astype(np.float32)
    direct = ort.InferenceSession(trained.onnx).run(None, {"input": x})
    async with grpc.aio.insecure_channel(f"127.0.0.1:{stack.inference_grpc_port}") as ch:
        stub = oip_grpc.GRPCInferenceServiceStub(ch)
        assert (await stub.ServerLive(oip.ServerLiveRequest())).live
        meta = await stub.ModelMetadata(oip.ModelMetadataRequest(name="ctr"))
        assert meta.platform == "onnx_onnxv1" and list(meta.versions) == [str(version)]
        assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [
            ("input", "FP32", [-1, len(FEATURES)])
        ]
        assert {t.name for t in meta.outputs} == {"label", "probabilities"}
        assert (await stub.ServerReady(oip.ServerReadyRequest())).ready
        # typed contents in, typed contents out
        req = oip.ModelInferRequest(model_name="ctr", id="typed")
        t = req.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
        t.contents.fp32_contents.extend(x.reshape(-1).tolist())
        resp = await stub.ModelInfer(req)
        assert resp.id == "typed" and resp.model_version == str(version)
        out = {o.name: o for o in resp.outputs}
        probs = np.array(out["probabilities"].contents.fp32_contents, dtype=np.float32).reshape(
            7, 2
        )
        assert np.array_equal(probs, direct[1])
        assert list(out["label"].contents.int64_contents) == direct[0].tolist()
        # a wrong datatype is INVALID_ARGUMENT
        bad = oip.ModelInferRequest(model_name="ctr")
        bad.inputs.add(name="input", datatype="FP64", shape=[1, len(FEATURES)])
        bad.raw_input_contents.append(np.zeros(len(FEATURES)).tobytes())
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.ModelInfer(bad)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "expects FP32" in (
            err.value.details() or ""
        )


async def ledger_records(nc: NATS, settings: Settings, n: int) -> list[InferenceRecord]:
    """The first ``n`` records on the INFERENCES stream (waiting for them)."""
    js = bus.jetstream(nc, settings)
    sub = await js.pull_subscribe("myelin.inferences.>", stream=INFERENCES_STREAM)
    out: list[InferenceRecord] = []
    deadline = time.monotonic() + 10
    while len(out) < n and time.monotonic() < deadline:
        try:
            for m in await sub.fetch(10, timeout=0.5):
                out += msgspec.msgpack.decode(m.data, type=list[InferenceRecord])
        except TimeoutError:
            continue
    await sub.unsubscribe()
    return out


async def test_the_ledger_records_each_request_once_with_its_stages_and_tensors(
    stack: Settings, nc: NATS
) -> None:
    """Every Predict and ModelInfer is recorded once per request id, with its route, the
    time spent reading features and scoring, and (OIP) its tensors: values under the cap,
    a hash beyond it. On main a retried request id was recorded twice, and nothing of the
    stages or tensors was kept."""
    await register(nc, stack, tiny_model())
    async with grpc.aio.insecure_channel(f"127.0.0.1:{stack.inference_grpc_port}") as ch:
        predictor = mp_grpc.PredictorStub(ch)
        for _ in range(2):  # a client's retry of the same request
            await predictor.Predict(
                mp.PredictRequest(model_name="ctr", entity_ids=["u0", "u1"], request_id="same")
            )
        await predictor.Predict(
            mp.PredictRequest(
                model_name="ctr", model_version="1", entity_ids=["u2"], request_id="v1"
            )
        )
        oip_stub = oip_grpc.GRPCInferenceServiceStub(ch)
        for rid, rows in (("small", 8), ("large", 1024)):  # 416 B and 53 KB of FP32
            x = np.full((rows, len(FEATURES)), 2.0, dtype=np.float32)
            req = oip.ModelInferRequest(model_name="ctr", id=rid)
            req.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
            req.raw_input_contents.append(x.tobytes())
            await oip_stub.ModelInfer(req)
    recs = {r.request_id: r for r in await ledger_records(nc, stack, 4)}
    assert sorted(recs) == ["large", "same", "small", "v1"]  # "same" once
    same = recs["same"]
    assert (same.route, same.rows, [p.entity_id for p in same.predictions]) == (
        "champion",
        2,
        ["u0", "u1"],
    )
    assert same.read_us > 0 and same.score_us > 0
    assert same.latency_us >= same.read_us + same.score_us
    assert recs["v1"].route == "pinned"
    small, large = recs["small"], recs["large"]
    [inp] = small.inputs
    assert (inp.name, inp.datatype, inp.shape, inp.values[:2]) == (
        "input",
        "FP32",
        [8, len(FEATURES)],
        [2.0, 2.0],
    )
    assert {o.name for o in small.outputs} == {"label", "probabilities"}
    assert small.outputs[0].values  # the outputs as returned, too
    [big] = large.inputs
    assert big.values == [] and big.nbytes == 1024 * len(FEATURES) * 4 and len(big.sha256) == 64
    assert small.score_us > 0 and small.read_us == 0  # OIP reads no features
