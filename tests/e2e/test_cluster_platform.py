"""The platform on real distributed engines: a three-node JetStream cluster (every stream
and bucket at replicas 3) and a Redis Cluster (three masters, the online store's
partitions spread over them by hash tag). Events flow through HTTP ingest, two features
workers sharing the partitions and the warehouse while the EVENTS stream's leader is
killed (-9) mid-stream. Nothing is lost and nothing is doubled: every event is applied
once and stored once, and the online vectors read back from the Redis Cluster equal their
offline recomputation."""

from __future__ import annotations

import asyncio
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest

from faults.harness import register_model
from myelin import bus
from myelin.api_tokens import client_headers
from myelin.settings import Settings
from myelin.stack.engines import NatsCluster, RedisCluster, redis_cluster_ports
from myelin.stack.process import free_port
from myelin.stack.supervisor import Stack
from myelin.subjects import EVENTS_STREAM, RPC_FEATURES_CHECK, health_subject
from tests.helpers import clickstream, offline_counts, wait_caught_up

pytestmark = pytest.mark.e2e
N = 12_000


async def post_until_stored(settings: Settings, batch: list[dict[str, Any]]) -> None:
    """A producer's retries: the same batch again until ingest stores it (a retried event
    comes back ``duplicate``, never stored twice)."""
    url = f"http://127.0.0.1:{settings.ingest_http_port}/v1/events"
    deadline = time.monotonic() + 60
    async with aiohttp.ClientSession(headers=client_headers(settings)) as http:
        while True:
            try:
                async with http.post(url, json=batch) as r:
                    if r.status == 200:
                        return
                    detail = await r.text()
            except aiohttp.ClientError as exc:
                detail = repr(exc)
            assert time.monotonic() < deadline, detail
            await asyncio.sleep(0.5)


PREDICT = """
import asyncio, json, sys
import grpc
from myelin.gen import myelin_predict_pb2 as mp, myelin_predict_pb2_grpc as mp_grpc
async def main():
    async with grpc.aio.insecure_channel(sys.argv[1]) as ch:
        r = await mp_grpc.PredictorStub(ch).Predict(
            mp.PredictRequest(model_name="ctr", entity_ids=sys.argv[2:]), timeout=10
        )
    print(json.dumps([
        {"entity_id": p.entity_id, "score": p.score, "feature_status": p.feature_status}
        for p in r.predictions
    ]))
asyncio.run(main())
"""


async def predict(settings: Settings, users: list[str]) -> list[dict[str, Any]]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        PREDICT,
        f"127.0.0.1:{settings.inference_grpc_port}",
        *users,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()[-2000:]
    result: list[dict[str, Any]] = msgspec.json.decode(out.strip().splitlines()[-1])
    return result


async def wait_for_meta_leader(settings: Settings, timeout_s: float = 30.0) -> None:
    """Until the cluster answers JetStream requests (it elects a meta leader first)."""
    nc = await bus.connect(settings, "test-wait")
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                await bus.jetstream(nc, settings).account_info()
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.3)
    finally:
        await nc.close()


def settle_report(s: Settings, workers: list[dict[str, Any]]) -> str:
    """What each features worker says and logged about its leases (the workers run in
    processes of their own: their logs are not captured by pytest)."""
    lines = [f"partitions held: {sorted(p for w in workers for p in w['partitions'])}"]
    for w in workers:
        lines.append(
            f"{w['worker']}: partitions {w['partitions']}, members {w['workers']}, "
            f"moves {w['partition_moves']}, lease error {w['lease_error']!r}"
        )
    for name in ("features", "features-2"):
        log_file = s.state_dir / "logs" / f"{name}.log"
        text = log_file.read_text(errors="replace") if log_file.exists() else ""
        keep = [
            line
            for line in text.splitlines()
            if "lease" in line or "partition" in line or " WARNING " in line or " ERROR " in line
        ]
        lines += [f"-- {name}.log (lease, partition, warnings; last 60)", *keep[-60:]]
    return "\n".join(lines)


@pytest.mark.timeout(480)  # a failover on a loaded 2-core machine took up to ~2 min
async def test_the_platform_keeps_flowing_when_the_events_leader_dies(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ports = [free_port() for _ in range(6)]
    async with (
        NatsCluster(tmp_path / "cluster", ports[:3], ports[3:6]) as cluster,
        RedisCluster(tmp_path / "redis-cluster", redis_cluster_ports(3)) as redis_cluster,
    ):
        # as an operator points the platform at clusters: MYELIN_NATS_URL (no embedded
        # nats-server), MYELIN_STREAM_REPLICAS, MYELIN_REDIS_URL + MYELIN_REDIS_CLUSTER
        monkeypatch.setenv("MYELIN_NATS_URL", cluster.url)
        monkeypatch.setenv("MYELIN_REDIS_URL", redis_cluster.url)
        s = replace(
            settings,
            nats_url=cluster.url,
            stream_replicas=3,
            redis_url=redis_cluster.url,
            redis_cluster=True,
            features_workers=2,
        )
        await wait_for_meta_leader(s)
        events = clickstream(
            N,
            prefix="c",
            now_ms=int(time.time() * 1000),
            users=200,
            items=40,
            ago_ms=600_000,
            step_ms=40,
        )
        async with Stack(
            s,
            log=lambda _m: None,
            services=("governance", "warehouse", "features", "inference", "ingest"),
        ):
            await register_model(s)
            nc = await bus.connect(s, "test")
            try:
                js = bus.jetstream(nc, s)
                info = await js.stream_info(EVENTS_STREAM)
                assert info.config.num_replicas == 3 and info.cluster is not None
                leader = info.cluster.leader
                for at in range(0, N, 1000):
                    if at == N // 2:  # kill -9 of the EVENTS leader, half way through
                        next(x for i, x in enumerate(cluster.servers) if f"n{i}" == leader).kill()
                    await post_until_stored(s, events[at : at + 1000])
                await wait_caught_up(nc, s, timeout=120)
                after = await js.stream_info(EVENTS_STREAM)
                assert after.cluster is not None and after.cluster.leader != leader
                # after the failover the workers settle on each partition held once
                deadline = time.monotonic() + 30
                while True:
                    workers = [
                        msgspec.json.decode(await bus.request(nc, health_subject(name), {}))
                        for name in ("features", "features-2")
                    ]
                    held = sorted(p for w in workers for p in w["partitions"])
                    if held == list(range(s.partitions)):
                        break
                    assert time.monotonic() < deadline, settle_report(s, workers)
                    await asyncio.sleep(0.5)
                counts = {
                    k: sum(w[k] for w in workers)
                    for k in ("events", "applied", "late", "duplicates")
                }
                counts["stream"] = int(after.state.messages)
                offline = await offline_counts(nc)
                counts["offline"], counts["feature_rows"] = offline["events"], offline["fv"]
                # each event took effect once (a copy resent by a retry is recognised by its
                # event id) and is stored once
                assert counts["feature_rows"] + counts["late"] == N, counts  # once each
                assert counts["applied"] + counts["late"] == N, counts
                assert counts["offline"] == N, counts
                # the online vectors, read from the Redis Cluster, equal their recomputation
                check = msgspec.json.decode(
                    await bus.request(nc, RPC_FEATURES_CHECK, {"sample": 60}, timeout=60)
                )
                assert check["mismatches"] == [] and check["matched"] > 0, check
                # and inference serves them: Predict reads the Redis Cluster (its own
                # process: gRPC's threads must not live in the one that forks the stack)
                users = sorted({e["data"]["user_id"] for e in events})[:40]
                answer = await predict(s, users)
                assert [p["entity_id"] for p in answer] == users
                assert {p["feature_status"] for p in answer} <= {"FRESH", "STALE"}, answer
                assert all(0.0 <= p["score"] <= 1.0 for p in answer)
            finally:
                await nc.close()
