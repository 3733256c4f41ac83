"""Ingest throughput: events/s accepted end to end (validated, PII-tokenized, published,
acked by JetStream) through the HTTP batch path, the NATS request path and the
one-message-per-event path, next to bare nats-py publishing the same pre-encoded events
with the same batching, measured in the same run against the same nats-server.

Run: .venv/bin/python -m bench.ingest_bench [--events N]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import msgspec

from bench._common import table
from myelin import bus
from myelin.api_tokens import client_headers
from myelin.contracts import StreamEvent
from myelin.settings import Settings
from myelin.stack.process import free_port
from myelin.stack.supervisor import Stack, with_ports
from myelin.subjects import EVENTS_STREAM, RPC_INGEST_PUBLISH

ROOT = Path(__file__).resolve().parents[1]
BATCH = 2000  # events per HTTP / NATS request
PER_MESSAGE = 100  # events per JetStream message on the batched path


def make_events(n: int, tag: str) -> list[dict[str, Any]]:
    now = int(time.time() * 1000)
    out = []
    for i in range(n):
        if i % 10 == 9:
            data = {
                "user_id": f"u{i % 5000}",
                "item_id": f"i{i % 300}",
                "amount": 12.5,
                "email": f"user{i % 5000}@example.org",
            }
            out.append(
                {
                    "event_id": f"{tag}-{i}",
                    "type": "purchase",
                    "schema_version": 2,
                    "event_time": now - 60_000 + i % 60_000,
                    "producer_id": "bench",
                    "data": data,
                }
            )
        else:
            out.append(
                {
                    "event_id": f"{tag}-{i}",
                    "type": "click",
                    "schema_version": 1,
                    "event_time": now - 60_000 + i % 60_000,
                    "producer_id": "bench",
                    "data": {"user_id": f"u{i % 5000}", "item_id": f"i{i % 300}"},
                }
            )
    return out


async def run_http(
    url: str, bodies: list[bytes], concurrency: int, headers: dict[str, str] | None = None
) -> tuple[int, float]:
    accepted = 0
    sem = asyncio.Semaphore(concurrency)
    async with aiohttp.ClientSession(headers=headers) as http:

        async def send(body: bytes) -> None:
            nonlocal accepted
            async with sem:
                while True:
                    async with http.post(
                        url, data=body, headers={"Content-Type": "application/json"}
                    ) as r:
                        res = await r.json()
                        if r.status == 429:
                            await asyncio.sleep(float(r.headers.get("Retry-After", "1")))
                            continue
                        accepted += res["accepted"]
                        return

        t = time.perf_counter()
        await asyncio.gather(*(send(b) for b in bodies))
        return accepted, time.perf_counter() - t


async def run_nats(nc: Any, bodies: list[bytes], concurrency: int) -> tuple[int, float]:
    accepted = 0
    sem = asyncio.Semaphore(concurrency)

    async def send(body: bytes) -> None:
        nonlocal accepted
        async with sem:
            res = msgspec.json.decode(await bus.request(nc, RPC_INGEST_PUBLISH, body, timeout=60))
            accepted += res["accepted"]

    t = time.perf_counter()
    await asyncio.gather(*(send(b) for b in bodies))
    return accepted, time.perf_counter() - t


def stored_form(events: list[dict[str, Any]]) -> list[StreamEvent]:
    mp = msgspec.msgpack.Encoder()
    return [
        StreamEvent(
            event_id=e["event_id"],
            type=e["type"],
            schema_version=e["schema_version"],
            event_time=e["event_time"],
            ingest_time=e["event_time"],
            producer_id="bench",
            client_version="",
            trace_id="0" * 32,
            entity_id=e["data"]["user_id"],
            partition=i % 8,
            data=msgspec.Raw(mp.encode(e["data"])),
        )
        for i, e in enumerate(events)
    ]


async def bare_publish(
    js: Any, payloads: list[tuple[str, bytes, str]], events_per_msg: int
) -> float:
    """The same messages, published by bare nats-py with the async window, all acked."""
    t = time.perf_counter()
    futs = [
        await js.publish_async(subj, data, headers={"Nats-Msg-Id": mid})
        for subj, data, mid in payloads
    ]
    await asyncio.gather(*futs)
    return len(payloads) * events_per_msg / (time.perf_counter() - t)


async def main(n: int, n_single: int, workers: int) -> None:
    state = Path(tempfile.mkdtemp(prefix="myelin-bench-"))
    base = replace(Settings.from_env(), state_dir=state, policy_dir=ROOT / "policies")
    base = replace(base, ingest_workers=workers)
    s = with_ports(
        base,
        nats_port=free_port(),
        redis_port=free_port(),
        ingest_http_port=free_port(),
        inference_grpc_port=free_port(),
        warehouse_http_port=free_port(),
        ops_http_port=free_port(),
    )
    enc = msgspec.json.Encoder()
    mp = msgspec.msgpack.Encoder()
    rows: list[tuple[str, str, float, float, str]] = []
    try:
        async with Stack(s, log=lambda _m: None, services=("ingest",)):
            nc = await bus.connect(s, "bench", identity="admin")
            js = bus.jetstream(nc, s)
            url = f"http://127.0.0.1:{s.ingest_http_port}/v1/events"
            # warm-up
            await run_http(url, [enc.encode(make_events(BATCH, "warm"))], 1, client_headers(s))

            http_events = make_events(n, "h")
            acc, el = await run_http(
                url,
                [enc.encode(http_events[i : i + BATCH]) for i in range(0, n, BATCH)],
                4,
                client_headers(s),
            )
            assert acc == n, f"HTTP accepted {acc} of {n}"
            http_rate = n / el
            nats_events = make_events(n, "n")
            acc, el = await run_nats(
                nc, [enc.encode(nats_events[i : i + BATCH]) for i in range(0, n, BATCH)], 4
            )
            assert acc == n, f"NATS accepted {acc} of {n}"
            nats_rate = n / el
            single = make_events(n_single, "s")
            acc, el = await run_http(
                url + "?mode=per_event",
                [enc.encode(single[i : i + BATCH]) for i in range(0, n_single, BATCH)],
                4,
                client_headers(s),
            )
            assert acc == n_single
            single_rate = n_single / el

            stored = stored_form(make_events(n, "b"))
            batched = [
                (f"myelin.events.{i % 8}", mp.encode(stored[i : i + PER_MESSAGE]), f"bare-b-{i}")
                for i in range(0, n, PER_MESSAGE)
            ]
            bare_batched = await bare_publish(js, batched, PER_MESSAGE)
            stored1 = stored_form(make_events(n_single, "c"))
            per_event = [
                (f"myelin.events.{i % 8}", mp.encode([e]), f"bare-c-{i}")
                for i, e in enumerate(stored1)
            ]
            bare_single = await bare_publish(js, per_event, 1)
            total = (await js.stream_info(EVENTS_STREAM)).state.messages
            await nc.close()
    finally:
        shutil.rmtree(state, ignore_errors=True)
    rows += [
        (
            "HTTP batch path (2000/request, 4 in flight)",
            "events/s",
            http_rate,
            bare_batched,
            f"ceiling: bare nats-py, {PER_MESSAGE} events/msg; target >= 250k and >= 0.5x",
        ),
        (
            "NATS request path (2000/request, 4 in flight)",
            "events/s",
            nats_rate,
            bare_batched,
            f"ceiling: bare nats-py, {PER_MESSAGE} events/msg; target >= 250k and >= 0.5x",
        ),
        (
            "one message per event (HTTP ?mode=per_event)",
            "events/s",
            single_rate,
            bare_single,
            "ceiling: bare nats-py, 1 event/msg, async window; target >= 0.7x",
        ),
    ]
    print(
        table(
            f"Ingest throughput, {workers} ingest worker(s) ({n:,} events per batched run, {n_single:,} per-event; "
            f"{total:,} messages stored)",
            rows,
        )
    )


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=400_000)
    ap.add_argument("--single", type=int, default=60_000)
    ap.add_argument(
        "--workers", type=int, default=2, help="ingest processes (MYELIN_INGEST_WORKERS)"
    )
    a = ap.parse_args()
    asyncio.run(main(a.events, a.single, a.workers))
