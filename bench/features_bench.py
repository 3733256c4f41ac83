"""Feature pipeline benchmark, in one run on the same machine:

1. throughput, with 1 and then 2 features workers (each on a fresh stack): events/s
   through the feature pipeline as deployed (the features processes: decode, windows,
   Redis state + online vectors, feature rows to the FEATURES stream, ack; the warehouse
   process: raw events and feature rows into ClickHouse), until both stores hold
   everything, next to a bare JetStream pull consume + ack of the same messages, and the
   CPU microseconds the features processes spent per event. Messages hold 100 events of
   one partition (as ingest writes them), over 8 partitions. The events are the worst
   case for per-entity costs: 20,000 entities, so every batch touches each entity once,
   and each event opens a new minute bucket;
2. freshness: publish -> visible in the online read, p50/p99, under a steady 20k
   events/s from a producer task (live event times, 20,000 entities), measured by probe
   events every 50 ms;
3. online reads: p50/p99 for 1 and 100 entities next to bare redis-py reads of the same
   entities.

Run: .venv/bin/python -m bench.features_bench [--events N] [--rate R] [--seconds S]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import msgspec
import psutil
import redis.asyncio as aioredis

from bench._common import pct, table
from myelin import bus, online, redis_users
from myelin.consume import ensure_consumer
from myelin.contracts import StreamEvent
from myelin.online import OnlineReader
from myelin.settings import Settings
from myelin.sql_client import wait_stored
from myelin.stack.process import free_port
from myelin.stack.supervisor import Stack, with_ports
from myelin.subjects import EVENTS_STREAM, FEATURES_STREAM, health_subject, partition_of

ROOT = Path(__file__).resolve().parents[1]
PER_MSG = 100
USERS = 20_000
PARTITIONS = 8
_mp = msgspec.msgpack.Encoder()


def stream_event(event_id: str, typ: str, user: str, t: int) -> StreamEvent:
    return StreamEvent(
        event_id=event_id,
        type=typ,
        schema_version=1,
        event_time=t,
        ingest_time=t,
        producer_id="bench",
        client_version="",
        trace_id="0" * 32,
        entity_id=user,
        partition=partition_of(user, PARTITIONS),
        data=msgspec.Raw(_mp.encode({"user_id": user, "item_id": f"i{hash(event_id) % 50}"})),
    )


def messages(n: int, start_ms: int, tag: str, spread_ms: int = 600_000) -> list[tuple[str, bytes]]:
    """(subject, payload): up to 100 events of one partition per message, in event order."""
    out: list[tuple[str, bytes]] = []
    pending: dict[int, list[StreamEvent]] = {}
    for i in range(n):
        ev = stream_event(
            f"{tag}{i}",
            "click" if i % 5 == 0 else "impression",
            f"u{i % USERS}",
            start_ms + (i * spread_ms) // max(n, 1),
        )
        buf = pending.setdefault(ev.partition, [])
        buf.append(ev)
        if len(buf) == PER_MSG:
            out.append((f"myelin.events.{ev.partition}", _mp.encode(buf)))
            pending[ev.partition] = []
    out += [(f"myelin.events.{p}", _mp.encode(b)) for p, b in pending.items() if b]
    return out


async def status(nc: Any, name: str = "features") -> dict[str, Any]:
    result: dict[str, Any] = msgspec.json.decode(await bus.request(nc, health_subject(name), {}))
    return result


async def applied(nc: Any, workers: int) -> tuple[int, int]:
    """(events applied by all workers, the version's position)."""
    got = [
        await status(nc, "features" if k == 1 else f"features-{k}") for k in range(1, workers + 1)
    ]
    return sum(int(h["events"]) for h in got), int(got[0]["position"])


async def throughput(
    stack: Stack, nc: Any, js: Any, n: int, workers: int
) -> tuple[float, float, float]:
    """(events/s into Redis + ClickHouse, bare consume + ack events/s, features CPU us per
    event)."""
    payloads = messages(n, int(time.time() * 1000) - 900_000, "t")
    futs = [
        await js.publish_async(subject, p, headers={"Nats-Msg-Id": f"t-{k}"})
        for k, (subject, p) in enumerate(payloads)
    ]
    await asyncio.gather(*futs)
    last = (await js.stream_info(EVENTS_STREAM)).state.last_seq

    batch = stack.settings.features_batch  # bare: pull consume + ack, same batch size
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
    bare = n / (time.perf_counter() - t0)
    await psub.unsubscribe()

    # Myelin: the warehouse and features service processes, as deployed. The rate is
    # measured from the features workers' first reported progress (process start-up and
    # chdb opening are not pipeline time) until Redis *and* ClickHouse hold everything.
    await stack.start_service("warehouse")
    await stack.start_service("features")
    cpu0 = cpu_times()
    first: tuple[float, int] | None = None
    while True:
        events, pos = await applied(nc, workers)
        now = time.perf_counter()
        if first is None and events > 0:
            first = (now, events)
        if pos >= last:
            break
        await asyncio.sleep(0.02)
    online_done = now
    features_last = (await js.stream_info(FEATURES_STREAM)).state.last_seq
    await wait_stored(nc, events_seq=last, features_seq=features_last, timeout=600)
    stored = time.perf_counter()
    assert first is not None
    busy = {k: v - cpu0.get(k, 0.0) for k, v in cpu_times().items()}
    print(
        f"{workers} worker(s): CPU seconds during the throughput run: "
        + ", ".join(f"{k} {v:.1f}" for k, v in sorted(busy.items(), key=lambda kv: -kv[1])),
        flush=True,
    )
    done = n - first[1]
    features_cpu = sum(v for k, v in busy.items() if k == "features")
    print(
        f"online store done after {online_done - first[0]:.2f} s, ClickHouse after "
        f"{stored - first[0]:.2f} s",
        flush=True,
    )
    return done / (stored - first[0]), bare, features_cpu / n * 1e6


async def freshness(
    nc: Any, js: Any, reader: OnlineReader, rate: int, seconds: float
) -> tuple[list[float], float]:
    """A producer at ``rate`` events/s (one message of 100 every 100/rate s, built before
    the run with the event times of their sending slots, so building them does not load
    the machine during the run); every 50 ms a message carries a probe event, whose
    visibility in the online read is timed from just before its publish."""
    period = PER_MSG / rate
    count = int(seconds / period)
    every = max(1, round(0.05 / period))
    base = time.time() + 1.0 + count * PER_MSG * 4e-6  # after the build below
    payloads: list[tuple[str, bytes, str]] = []
    by_part: dict[int, list[str]] = {}
    for i in range(USERS):
        by_part.setdefault(partition_of(f"u{i}", PARTITIONS), []).append(f"u{i}")
    for k in range(count):
        t_ms = int((base + k * period) * 1000)
        part = k % PARTITIONS  # a message holds one partition's events, as ingest writes
        users = by_part[part]
        probe = ""
        if k % every == 0:
            probe = next(
                f"probe-{k}-{x}"
                for x in range(1000)
                if partition_of(f"probe-{k}-{x}", PARTITIONS) == part
            )
        evs = [
            stream_event(
                f"f{k}-{j}",
                "click" if j % 5 == 0 else "impression",
                probe if (j == 0 and probe) else users[(k * PER_MSG + j) % len(users)],
                t_ms,
            )
            for j in range(PER_MSG)
        ]
        payloads.append((f"myelin.events.{part}", _mp.encode(evs), probe))
    await asyncio.sleep(max(0.0, base - time.time()))

    probes: asyncio.Queue[tuple[float, int, str]] = asyncio.Queue()
    lat: list[float] = []
    warmup_until = time.monotonic() + 1.0

    async def probe_loop() -> None:
        while True:
            t_pub, seq, entity = await probes.get()
            while True:
                [v] = await reader.read("user_activity", [entity])
                if v.seq >= seq * 1000:
                    if time.monotonic() > warmup_until:
                        lat.append((time.perf_counter() - t_pub) * 1000)
                    break
                await asyncio.sleep(0.002)

    prober = asyncio.create_task(probe_loop())
    cpu0 = cpu_times()
    t0 = time.perf_counter()
    start = time.monotonic()
    for k, (subject, payload, probe) in enumerate(payloads):
        await asyncio.sleep(max(0.0, start + k * period - time.monotonic()))
        t_pub = time.perf_counter()
        ack = await js.publish(subject, payload)
        if probe:
            probes.put_nowait((t_pub, ack.seq, probe))
    offered = count * PER_MSG / (time.perf_counter() - t0)
    busy = {k: (v - cpu0.get(k, 0.0)) / (time.perf_counter() - t0) for k, v in cpu_times().items()}
    print(
        "CPU during the freshness run (cores): "
        + ", ".join(f"{k} {v:.2f}" for k, v in sorted(busy.items(), key=lambda kv: -kv[1])),
        flush=True,
    )
    while not probes.empty():  # noqa: ASYNC110 - let the last probes land
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.5)
    prober.cancel()
    if os.environ.get("MYELIN_BENCH_TRACE"):
        print(" ".join(f"{x:.0f}" for x in lat))
    return lat, offered


def cpu_times() -> dict[str, float]:
    """CPU seconds used so far by this process and each child (by service name)."""
    me = psutil.Process()
    out = {"bench": sum(me.cpu_times()[:2])}
    for child in me.children(recursive=True):
        try:
            cmd = " ".join(child.cmdline())
            name = cmd.split("services.")[-1] if "services." in cmd else child.name()
            out[name] = out.get(name, 0.0) + sum(child.cpu_times()[:2])
        except psutil.Error:
            continue
    return out


async def reads(
    r: aioredis.Redis, reader: OnlineReader
) -> list[tuple[str, str, float, float, str]]:
    rows: list[tuple[str, str, float, float, str]] = []
    users = [f"u{i}" for i in range(USERS)]
    meta = await reader.meta("user_activity")
    version, parts = meta.hash, meta.partitions
    for count in (1, 100):
        ours: list[float] = []
        bare: list[float] = []
        for i in range(2000 if count == 1 else 500):
            ids = [users[(i * count + j) % USERS] for j in range(count)]
            t = time.perf_counter()
            await reader.read("user_activity", ids)
            ours.append((time.perf_counter() - t) * 1000)
            t = time.perf_counter()  # the bare ceiling: one HMGET per partition, pipelined
            groups: dict[int, list[str]] = {}
            for u in ids:
                groups.setdefault(partition_of(u, parts), []).append(u)
            async with r.pipeline(transaction=False) as pipe:
                for p, members in groups.items():
                    pipe.hmget(online.entities_key("user_activity", version, p), members)
                await pipe.execute()
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
    return rows


async def main(n: int, rate: int, seconds: float) -> None:
    rows: list[tuple[str, str, float, float, str]] = []
    rates: dict[int, float] = {}
    for workers in (1, 2):
        state = Path(tempfile.mkdtemp(prefix="myelin-fbench-"))
        base = replace(
            Settings.from_env(),
            state_dir=state,
            policy_dir=ROOT / "policies",
            partitions=PARTITIONS,
            features_workers=workers,
        )
        s = with_ports(
            base,
            nats_port=free_port(),
            redis_port=free_port(),
            warehouse_http_port=free_port(),
            ops_http_port=free_port(),
        )
        try:
            async with Stack(s, services=(), log=lambda _m: None) as stack:
                nc = await bus.connect(s, "bench", identity="admin")
                js = bus.jetstream(nc, s)
                r = aioredis.Redis.from_url(redis_users.client_url(s, "admin"))
                reader = OnlineReader(r)
                ours, bare, us = await throughput(stack, nc, js, n, workers)
                rates[workers] = ours
                rows.append(
                    (
                        f"features pipeline -> Redis + ClickHouse, {workers} worker(s)",
                        "events/s",
                        ours,
                        bare,
                        f"ceiling: bare pull consume + ack, {PER_MSG} events/msg; target >= 150k",
                    )
                )
                rows.append(
                    (
                        f"features CPU per event, {workers} worker(s)",
                        "us/event",
                        us,
                        1e6 / bare,
                        "ceiling: wall time per event of the bare consume + ack",
                    )
                )
                if workers == 2:
                    lat, offered = await freshness(nc, js, reader, rate, seconds)
                    for q, note in (
                        (50, "publish -> visible in online read"),
                        (99, "target p99 < 100 ms"),
                    ):
                        rows.append(
                            (
                                f"freshness at {offered:,.0f} events/s, 2 workers "
                                f"({len(lat)} probes)",
                                f"p{q} ms",
                                pct(lat, q),
                                float("nan"),
                                note,
                            )
                        )
                    rows.extend(await reads(r, reader))
                await r.aclose()
                await nc.close()
        finally:
            shutil.rmtree(state, ignore_errors=True)
    print(table(f"Feature pipeline ({n:,} events, {USERS:,} entities)", rows))
    print(f"scaling factor, 2 workers / 1: {rates[2] / rates[1]:.2f}x (2 cores)")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=300_000)
    ap.add_argument("--rate", type=int, default=20_000, help="freshness load, events/s")
    ap.add_argument("--seconds", type=float, default=20.0, help="freshness run length")
    a = ap.parse_args()
    asyncio.run(main(a.events, a.rate, a.seconds))
