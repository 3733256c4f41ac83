"""Feature pipeline benchmark, in one run on the same machine:

1. throughput: events/s through the features service (decode, windows, ClickHouse raw +
   feature rows, Redis state + online vectors, ack) next to a bare JetStream pull consume
   + ack of the same messages;
2. freshness: publish -> visible in the online read, p50/p99, under a steady 20k events/s;
3. online reads: p50/p99 for 1 and 100 entities next to bare redis-py reads of the same keys.

Run: .venv/bin/python -m bench.features_bench [--events N]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import msgspec
import redis.asyncio as aioredis

from bench._common import pct, table
from myelin import bus, online
from myelin.consume import ensure_consumer
from myelin.contracts import StreamEvent
from myelin.online import OnlineReader
from myelin.settings import Settings
from myelin.stack.engines import NatsServer, RedisServer
from myelin.stack.process import free_port
from myelin.stack.supervisor import with_ports
from myelin.subjects import EVENTS_STREAM
from services.features.app import FeaturesApp

ROOT = Path(__file__).resolve().parents[1]
PER_MSG = 100
_mp = msgspec.msgpack.Encoder()


def messages(n: int, start_ms: int, users: int, tag: str, spread_ms: int = 600_000) -> list[bytes]:
    out = []
    for m in range(0, n, PER_MSG):
        evs = []
        for i in range(m, min(m + PER_MSG, n)):
            u = f"u{i % users}"
            typ = "click" if i % 5 == 0 else "impression"
            evs.append(
                StreamEvent(
                    event_id=f"{tag}{i}",
                    type=typ,
                    schema_version=1,
                    event_time=start_ms + (i * spread_ms) // max(n, 1),
                    ingest_time=start_ms,
                    producer_id="bench",
                    client_version="",
                    trace_id="0" * 32,
                    entity_id=u,
                    partition=0,
                    data=msgspec.Raw(_mp.encode({"user_id": u, "item_id": "x"})),
                )
            )
        out.append(_mp.encode(evs))
    return out


async def publish_all(js: object, subject: str, payloads: list[bytes], tag: str) -> None:
    futs = [
        await js.publish_async(subject, p, headers={"Nats-Msg-Id": f"{tag}-{k}"})  # type: ignore[attr-defined]
        for k, p in enumerate(payloads)
    ]
    await asyncio.gather(*futs)


async def main(n: int) -> None:
    state = Path(tempfile.mkdtemp(prefix="myelin-fbench-"))
    base = replace(Settings.from_env(), state_dir=state, policy_dir=ROOT / "policies")
    s = with_ports(base, nats_port=free_port(), redis_port=free_port())
    nats_srv = NatsServer(state / "nats", s.nats_port)
    redis_srv = RedisServer(state / "redis", s.redis_port)
    rows: list[tuple[str, str, float, float, str]] = []
    nats_srv.start()
    redis_srv.start()
    try:
        await nats_srv.wait_ready()
        await redis_srv.wait_ready()
        nc = await bus.connect(s, "bench")
        js = bus.jetstream(nc, s)
        await bus.provision(js, s)
        now = int(time.time() * 1000)
        payloads = messages(n, now - 900_000, 20_000, "t")
        await publish_all(js, "myelin.events.0", payloads, "t")
        last = (await js.stream_info(EVENTS_STREAM)).state.last_seq

        # bare: pull consume + ack of the same messages, same batch size
        batch = max(1, s.features_batch)
        await ensure_consumer(
            js, EVENTS_STREAM, "bare", "myelin.events.>", max_ack_pending=batch * 2, ack_wait_s=30
        )
        psub = await js.pull_subscribe_bind(durable="bare", stream=EVENTS_STREAM)
        got = 0
        t0 = time.perf_counter()
        while got < len(payloads):
            msgs = await psub.fetch(batch, timeout=2)
            got += len(msgs)
            await msgs[-1].ack()
        bare_rate = n / (time.perf_counter() - t0)

        # Myelin: the features service, in process, from the first sequence
        app = FeaturesApp(s)
        t0 = time.perf_counter()
        await app.start()
        while app.status()["position"] < last:  # noqa: ASYNC110 - polling the service
            await asyncio.sleep(0.01)
        ours_rate = n / (time.perf_counter() - t0)
        rows.append(
            (
                "features pipeline -> Redis + ClickHouse",
                "events/s",
                ours_rate,
                bare_rate,
                f"ceiling: bare pull consume + ack, {PER_MSG} events/msg; target >= 150k",
            )
        )

        # freshness under a steady 20k events/s: 1 message of 100 events every 5 ms
        r = aioredis.Redis.from_url(s.redis_url)
        reader = OnlineReader(r)
        lat: list[float] = []
        marker = "fresh-probe"
        stop = time.monotonic() + 8
        k = 0
        while time.monotonic() < stop:
            tick = time.perf_counter()
            t_ms = int(time.time() * 1000)
            evs = [
                StreamEvent(
                    event_id=f"f{k}-{j}",
                    type="impression",
                    schema_version=1,
                    event_time=t_ms,
                    ingest_time=t_ms,
                    producer_id="bench",
                    client_version="",
                    trace_id="0" * 32,
                    entity_id=marker if j == 0 else f"u{(k * 100 + j) % 20000}",
                    partition=0,
                    data=msgspec.Raw(
                        _mp.encode({"user_id": marker if j == 0 else "u", "item_id": "x"})
                    ),
                )
                for j in range(PER_MSG)
            ]
            ack = await js.publish("myelin.events.0", _mp.encode(evs))
            want = ack.seq * 1000
            if k % 10 == 0:  # probe every 10th message (every 50 ms)
                while True:
                    [v] = await reader.read("user_activity", [marker])
                    if v.seq >= want:
                        lat.append((time.perf_counter() - tick) * 1000)
                        break
                    await asyncio.sleep(0.001)
            k += 1
            await asyncio.sleep(max(0.0, 0.005 - (time.perf_counter() - tick)))
        rate = k * PER_MSG / 8
        rows.append(
            (
                f"freshness at {rate:,.0f} events/s",
                "p50 ms",
                pct(lat, 50),
                float("nan"),
                "publish -> visible in online read",
            )
        )
        rows.append(
            (
                f"freshness at {rate:,.0f} events/s",
                "p99 ms",
                pct(lat, 99),
                float("nan"),
                "target p99 < 100 ms",
            )
        )
        await app.stop()

        # online reads
        users = [f"u{i}" for i in range(20_000)]
        version = await reader.served_version("user_activity")
        for count in (1, 100):
            ours: list[float] = []
            bare: list[float] = []
            for i in range(2000 if count == 1 else 500):
                ids = [users[(i * count + j) % 20_000] for j in range(count)]
                t = time.perf_counter()
                await reader.read("user_activity", ids)
                ours.append((time.perf_counter() - t) * 1000)
                t = time.perf_counter()
                await r.hmget(online.entities_key("user_activity", version), ids)
                bare.append((time.perf_counter() - t) * 1000)
            for q in (50, 99):
                rows.append(
                    (
                        f"online read, {count} entit{'y' if count == 1 else 'ies'}",
                        f"p{q} ms",
                        pct(ours, q),
                        pct(bare, q),
                        "ceiling: bare redis-py HMGET of the same entities"
                        + ("; target p99 < 1 ms" if count == 1 and q == 99 else ""),
                    )
                )
        await r.aclose()
        await nc.close()
    finally:
        await nats_srv.stop()
        await redis_srv.stop()
        shutil.rmtree(state, ignore_errors=True)
    print(table(f"Feature pipeline ({n:,} events, 20,000 entities)", rows))


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=300_000)
    asyncio.run(main(ap.parse_args().events))
