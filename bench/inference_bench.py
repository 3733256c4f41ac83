"""Inference serving benchmark: Myelin's Predict and ModelInfer over gRPC, next to the
bare libraries measured in the same run on the same machine:

- a bare grpc.aio unary echo server (its own process, like the inference service),
  called by the same Python client with the same concurrency;
- one bare redis-py HMGET of the same entities;
- onnxruntime called directly on the same rows.

With the CPU the inference process spends per request (beside the echo server's), the
cost of a shadow version (scored off the hot path) on the champion's latency, and what
the drift counters cost per request (in process, timed on the same rows).

Run: .venv/bin/python -m bench.inference_bench  (prints a markdown table)
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import msgspec
import numpy as np
import onnxruntime as ort
import psutil
import redis.asyncio as aioredis

from bench._common import pct, table
from myelin import bus, grpc_client, online, redis_users
from myelin.gen import grpc_predict_v2_pb2 as oip
from myelin.gen import grpc_predict_v2_pb2_grpc as oip_grpc
from myelin.gen import myelin_predict_pb2 as mp
from myelin.gen import myelin_predict_pb2_grpc as mp_grpc
from myelin.models import ModelRegistry
from myelin.online import OnlineReader
from myelin.settings import Settings
from myelin.stack.process import free_port, wait_port
from myelin.stack.supervisor import Stack, with_ports
from myelin.subjects import health_subject, partition_of
from myelin.trainers import Trained
from services.inference.drift_counters import DriftCounters
from tests.helpers import FEATURES, register, tiny_model

ROOT = Path(__file__).resolve().parents[1]
ROUNDS = 5  # with and without a shadow, interleaved: p99s of 1,500 requests vary by ~20%
ECHO_SERVER = """
import asyncio, sys, grpc
async def main():
    async def echo(req, ctx):
        return req
    h = grpc.method_handlers_generic_handler("bench.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(echo)})
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((h,))
    server.add_insecure_port("127.0.0.1:" + sys.argv[1])
    await server.start()
    await server.wait_for_termination()
asyncio.run(main())
"""


async def load(
    call: Callable[[int], Awaitable[object]], n: int, concurrency: int
) -> tuple[float, list[float]]:
    lat: list[float] = []
    sem = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        async with sem:
            t = time.perf_counter()
            await call(i)
            lat.append((time.perf_counter() - t) * 1000)

    t0 = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(n)))
    return n / (time.perf_counter() - t0), lat


def cpu_s(proc: psutil.Process) -> float:
    """CPU seconds (user + system) a process has used, its threads included."""
    t = proc.cpu_times()
    return float(t.user + t.system)


async def health(nc: Any) -> dict[str, Any]:
    answer: dict[str, Any] = msgspec.json.decode(
        await bus.request(nc, health_subject("inference"), {})
    )
    return answer


async def wait_shadow(nc: Any, version: int, timeout_s: float = 20.0) -> None:
    """Until the inference service follows the shadow route (0: no shadow)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        h = msgspec.json.decode(await bus.request(nc, health_subject("inference"), {}))
        if h.get("routes", {}).get("ctr", {}).get("shadow", 0) == version:
            return
        await asyncio.sleep(0.2)
    raise TimeoutError("inference did not follow the shadow route")


def drift_cost(trained: Trained, predict_cpu_us: float) -> tuple[str, str, float, float, str]:
    """The drift counters' cost for a 1-entity request, timed in process on served rows."""
    counters = DriftCounters(trained.reference)
    rng = np.random.default_rng(0)
    rows = rng.poisson(3, (10_000, len(FEATURES))).astype(np.float32).tolist()
    scores = rng.random(10_000).tolist()
    t = time.perf_counter()
    for row, score in zip(rows, scores, strict=True):
        counters.observe([row], [score])
    per_request = (time.perf_counter() - t) / len(rows) * 1e6
    return (
        "Drift counters, 1-entity request",
        "us/req",
        per_request,
        predict_cpu_us,
        f"{len(FEATURES)} features + score, in process; beside: the whole Predict's server "
        "CPU per request (ratio: how many times smaller)",
    )


async def main() -> None:
    state = Path(tempfile.mkdtemp(prefix="myelin-bench-"))
    base = replace(Settings.from_env(), state_dir=state, policy_dir=ROOT / "policies")
    s = with_ports(
        base,
        nats_port=free_port(),
        redis_port=free_port(),
        ingest_http_port=free_port(),
        inference_grpc_port=free_port(),
        warehouse_http_port=free_port(),
        ops_http_port=free_port(),
    )
    echo_port = free_port()
    echo = subprocess.Popen([sys.executable, "-c", ECHO_SERVER, str(echo_port)])  # noqa: ASYNC220
    rows: list[tuple[str, str, float, float, str]] = []
    try:
        await wait_port("127.0.0.1", echo_port, 20)
        async with Stack(s, log=lambda _m: None) as stack:
            server = psutil.Process(stack.child("inference").pid)
            echo_proc = psutil.Process(echo.pid)
            nc = await bus.connect(s, "bench", identity="admin")
            trained = tiny_model()
            await register(nc, s, trained)  # with its drift reference: counters on
            users = [f"user-{i}" for i in range(1000)]
            r = aioredis.Redis.from_url(redis_users.client_url(s, "admin"))
            meta = await OnlineReader(r).meta("user_activity")
            width, version = len(meta.features), meta.hash
            now_ms = int(time.time() * 1000)
            for u in users:  # online records as the features service writes them (layout v4)
                await r.hset(
                    online.entities_key("user_activity", version, partition_of(u, meta.partitions)),
                    u,
                    online.encode_entity(1, now_ms, "", [1.0] * width, []),
                )

            async with (
                grpc_client.channel(s) as ch,
                grpc.aio.insecure_channel(f"127.0.0.1:{echo_port}") as ech,
            ):
                stub = mp_grpc.PredictorStub(ch)
                oip_stub = oip_grpc.GRPCInferenceServiceStub(ch)
                echo_call: Any = ech.unary_unary("/bench.Echo/Echo")
                payload = mp.PredictRequest(
                    model_name="ctr", entity_ids=["user-1"]
                ).SerializeToString()

                async def predict1(i: int) -> object:
                    return await stub.Predict(
                        mp.PredictRequest(model_name="ctr", entity_ids=[users[i % 1000]])
                    )

                async def predict100(i: int) -> object:
                    ids = [users[(i * 100 + j) % 1000] for j in range(100)]
                    return await stub.Predict(mp.PredictRequest(model_name="ctr", entity_ids=ids))

                async def echo1(_i: int) -> object:
                    return await echo_call(payload)

                def key_of(u: str) -> str:
                    return online.entities_key(
                        "user_activity", version, partition_of(u, meta.partitions)
                    )

                async def redis1(i: int) -> object:
                    u = users[i % 1000]
                    return await r.hmget(key_of(u), [u])

                async def redis100(i: int) -> object:  # one HMGET per partition, pipelined
                    groups: dict[str, list[str]] = {}
                    for j in range(100):
                        u = users[(i * 100 + j) % 1000]
                        groups.setdefault(key_of(u), []).append(u)
                    async with r.pipeline(transaction=False) as pipe:
                        for k, members in groups.items():
                            pipe.hmget(k, members)
                        return await pipe.execute()

                x = np.ones((256, len(FEATURES)), dtype=np.float32)
                req = oip.ModelInferRequest(model_name="ctr")
                req.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
                req.raw_input_contents.append(x.tobytes())

                async def infer256(_i: int) -> object:
                    return await oip_stub.ModelInfer(req)

                for warm in (predict1, echo1, redis1, infer256):
                    await load(warm, 200, 8)
                # sequential latency
                h0 = await health(nc)
                _, lp = await load(predict1, 2000, 1)
                h1 = await health(nc)
                lingered_1 = h1["predict_batches_lingered"] - h0["predict_batches_lingered"]
                _, le = await load(echo1, 2000, 1)
                _, lr = await load(redis1, 2000, 1)
                rows += [
                    (
                        "Predict 1 entity, 1 in flight",
                        "p50 ms",
                        pct(lp, 50),
                        pct(le, 50),
                        "ceiling: grpc.aio echo",
                    ),
                    (
                        "Predict 1 entity, 1 in flight",
                        "p99 ms",
                        pct(lp, 99),
                        pct(le, 99),
                        f"ceiling: grpc.aio echo; batches that waited for company: {lingered_1}",
                    ),
                    (
                        "Predict work beyond gRPC (1 entity)",
                        "p50 ms",
                        pct(lp, 50) - pct(le, 50),
                        pct(lr, 50),
                        "Predict minus echo (read, score, record) vs bare redis-py HMGET",
                    ),
                ]
                # throughput at 32 in flight, and the server CPU per request
                c0, h0 = cpu_s(server), await health(nc)
                rp, lp32 = await load(predict1, 6000, 32)
                cpu_predict = (cpu_s(server) - c0) / 6000 * 1e6
                h1 = await health(nc)
                per_batch = 6000 / max(1, h1["predict_batches"] - h0["predict_batches"])
                c0 = cpu_s(echo_proc)
                re_, le32 = await load(echo1, 6000, 32)
                cpu_echo = (cpu_s(echo_proc) - c0) / 6000 * 1e6
                rows += [
                    (
                        "Predict 1 entity, 32 in flight",
                        "req/s",
                        rp,
                        re_,
                        "ceiling: grpc.aio echo, same client",
                    ),
                    (
                        "Predict 1 entity, 32 in flight",
                        "p99 ms",
                        pct(lp32, 99),
                        pct(le32, 99),
                        f"{per_batch:.1f} requests per batch",
                    ),
                    (
                        "Predict 1 entity, 32 in flight: server CPU",
                        "us/req",
                        cpu_predict,
                        cpu_echo,
                        "inference process vs echo server process (ratio: echo / ours)",
                    ),
                ]
                _, lp100 = await load(predict100, 500, 1)
                _, lr100 = await load(redis100, 500, 1)
                rows += [
                    (
                        "Predict 100 entities, 1 in flight",
                        "p50 ms",
                        pct(lp100, 50),
                        pct(lr100, 50) + pct(le, 50),
                        "ceiling: echo + bare 100-entity HMGET",
                    )
                ]
                sess = ort.InferenceSession(trained.onnx, providers=["CPUExecutionProvider"])
                t = time.perf_counter()
                for _ in range(2000):
                    sess.run(None, {"input": x})
                ort_ms = (time.perf_counter() - t) / 2000 * 1000
                _, li = await load(infer256, 1000, 1)
                rows += [
                    (
                        "ModelInfer 256 rows (raw FP32)",
                        "p50 ms",
                        pct(li, 50),
                        pct(le, 50) + ort_ms,
                        f"ceiling: echo + onnxruntime direct ({ort_ms:.3f} ms)",
                    )
                ]
                # a shadow version, scored off the hot path on the same features: rounds with
                # and without it, interleaved, so that the machine's drift hits both alike
                reg = ModelRegistry(nc, bus.jetstream(nc, s))
                v2 = await register(nc, s, tiny_model(7), alias=None)
                runs: dict[bool, dict[str, list[float]]] = {
                    on: {"p99_1": [], "p99_32": [], "rps": [], "cpu": []} for on in (False, True)
                }
                for _ in range(ROUNDS):
                    for on in (False, True):
                        if on:
                            await reg.set_routes("ctr", shadow=v2, requester="bench")
                        else:
                            await reg.rollback("ctr", requester="bench")
                        await wait_shadow(nc, v2 if on else 0)
                        await load(predict1, 300, 8)
                        _, l1 = await load(predict1, 1500, 1)
                        c0 = cpu_s(server)
                        rps, l32 = await load(predict1, 3000, 32)
                        runs[on]["cpu"].append((cpu_s(server) - c0) / 3000 * 1e6)
                        runs[on]["p99_1"].append(pct(l1, 99))
                        runs[on]["p99_32"].append(pct(l32, 99))
                        runs[on]["rps"].append(rps)
                await reg.rollback("ctr", requester="bench")

                def med(on: bool, k: str) -> float:
                    return float(np.median(runs[on][k]))

                note = f"median of {ROUNDS} rounds, interleaved; beside: the same without a shadow"
                for path, unit, key in (
                    ("Predict with a shadow, 1 in flight", "p99 ms", "p99_1"),
                    ("Predict with a shadow, 32 in flight", "p99 ms", "p99_32"),
                    ("Predict with a shadow, 32 in flight", "req/s", "rps"),
                    ("Predict with a shadow, 32 in flight: server CPU", "us/req", "cpu"),
                ):
                    rows.append((path, unit, med(True, key), med(False, key), note))
            await nc.close()
            await r.aclose()
        rows.append(drift_cost(trained, cpu_predict))
    finally:
        echo.terminate()
        echo.wait()
        shutil.rmtree(state, ignore_errors=True)
    print(table("Inference serving (2-core machine, client and servers on one host)", rows))


if __name__ == "__main__":
    asyncio.run(main())
