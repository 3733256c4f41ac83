"""The demo's side of the platform: its names, ingest over HTTP, read-only SQL, the
services' health and the waits the demo's steps need (features applied, rows stored)."""

from __future__ import annotations

import asyncio
import time
import zlib
from typing import TYPE_CHECKING, Any, TextIO

import aiohttp
import msgspec

from myelin import bus, sql_client
from myelin.api_tokens import client_headers
from myelin.demo.progress import Progress
from myelin.settings import Settings
from myelin.sql_client import wait_stored
from myelin.subjects import EVENTS_STREAM, FEATURES_STREAM, health_subject

if TYPE_CHECKING:
    from myelin.demo.report import DemoReport

VIEW = "user_activity"
FEATURES = [
    "impressions_10m",
    "clicks_10m",
    "ctr_10m",
    "impressions_1h",
    "clicks_1h",
    "ctr_1h",
    "purchases_1h",
    "spend_1h",
]
MODEL = "ctr"
ANALYST_SQL = """SELECT toString(toStartOfInterval(event_time, INTERVAL 30 MINUTE)) AS half_hour,
       countIf(type = 'impression') AS impressions,
       countIf(type = 'click') AS clicks,
       round(clicks / impressions, 3) AS ctr,
       round(sumIf(JSONExtractFloat(data, 'amount'), type = 'purchase'), 2) AS revenue_eur
FROM myelin.events FINAL
GROUP BY half_hour ORDER BY half_hour"""


def say(out: TextIO, msg: str) -> None:
    print(msg, file=out, flush=True)


async def sql(nc: Any, query: str, *, arrow: bool = False, max_rows: int = 10_000_000) -> Any:
    if arrow:
        return await sql_client.query(nc, query, max_rows=max_rows)
    return await sql_client.query_rows(nc, query, max_rows=max_rows)


async def count(nc: Any, query: str) -> int:
    return int((await sql(nc, query))[0]["n"])


async def post(http: aiohttp.ClientSession, url: str, body: bytes) -> dict[str, Any]:
    while True:
        async with http.post(url, data=body, headers={"Content-Type": "application/json"}) as r:
            data: dict[str, Any] = await r.json()
            if r.status == 429:  # back-pressure: wait and send the same batch again
                await asyncio.sleep(float(r.headers.get("Retry-After", "1")))
                continue
            if r.status not in (200, 207, 422):
                raise RuntimeError(f"ingest answered {r.status}: {data}")
            return data


def ingest_url(settings: Settings) -> str:
    return f"http://127.0.0.1:{settings.ingest_http_port}/v1/events"


def tally(report: DemoReport, res: dict[str, Any]) -> None:
    report.accepted += res["accepted"]
    report.duplicates += res["duplicates"]
    report.rejected += res["rejected"]
    for r in res["results"]:
        if r["status"] == "rejected":
            report.rejected_by_reason[r["reason"]] = (
                report.rejected_by_reason.get(r["reason"], 0) + 1
            )


def ingest_rounds(
    events: list[dict[str, Any]], *, lanes: int = 4, batch: int = 2000, span_ms: int = 1_800_000
) -> list[list[list[dict[str, Any]]]]:
    """``events`` (in event-time order) as rounds of up to ``lanes`` batches sent together.

    Batches sent together may be applied in any order, so each user's events of a round are
    all in one batch (lanes by a hash of the user): every user's events are applied in their
    order, as the point-in-time training set assumes. A round covers at most ``span_ms`` of
    event time, so that no event lands more than the view's allowed lateness (an hour)
    behind another and is counted late (kept, but not applied)."""
    rounds: list[list[list[dict[str, Any]]]] = []
    i = 0
    while i < len(events):
        j = i
        limit = events[i]["event_time"] + span_ms
        while j < len(events) and j - i < lanes * batch and events[j]["event_time"] < limit:
            j += 1
        split: list[list[dict[str, Any]]] = [[] for _ in range(lanes)]
        for e in events[i:j]:
            split[zlib.crc32(e["data"]["user_id"].encode()) % lanes].append(e)
        rounds.append([b for b in split if b])
        i = j
    return rounds


async def ingest(
    settings: Settings,
    events: list[dict[str, Any]],
    report: DemoReport,
    out: TextIO,
    *,
    label: str = "ingest (HTTP batches)",
    resend_first: bool = True,
) -> float:
    """Send ``events`` in HTTP batches, four at a time (:func:`ingest_rounds`); the seconds
    it took."""
    url = ingest_url(settings)
    enc = msgspec.json.Encoder()
    prog = Progress(label, len(events), "events", out)
    async with aiohttp.ClientSession(headers=client_headers(settings)) as http:

        async def send(batch: list[dict[str, Any]]) -> None:
            tally(report, await post(http, url, enc.encode(batch)))
            prog.update(len(batch))

        for batches in ingest_rounds(events):
            await asyncio.gather(*(send(b) for b in batches))
        elapsed = prog.close()
        if resend_first and events:
            # A producer retry of already-sent events: every one comes back "duplicate".
            res = await post(http, url, enc.encode(events[:2000]))
            report.duplicates += res["duplicates"]
    return elapsed


async def health(nc: Any, service: str) -> dict[str, Any]:
    h: dict[str, Any] = msgspec.json.decode(await bus.request(nc, health_subject(service), {}))
    return h


async def wait_features(
    nc: Any, settings: Settings, out: TextIO | None, timeout_s: float = 300.0
) -> dict[str, Any]:
    """Until the features service has applied the whole EVENTS stream and the warehouse has
    stored it; its health then. ``out`` None: no progress line."""
    js = bus.jetstream(nc, settings)
    last = (await js.stream_info(EVENTS_STREAM)).state.last_seq
    prog = Progress("features catch up", last, "events", out) if out is not None else None
    seen = 0
    deadline = time.monotonic() + timeout_s
    while True:
        h = await health(nc, "features")
        if prog is not None:
            prog.update(h["position"] - seen)
        seen = h["position"]
        if seen >= last:
            if prog is not None:
                prog.close()
            # ... and the warehouse has stored the raw events and the feature values
            features_last = (await js.stream_info(FEATURES_STREAM)).state.last_seq
            await wait_stored(nc, events_seq=last, features_seq=features_last, timeout=timeout_s)
            return h
        if time.monotonic() > deadline:
            raise TimeoutError(f"features reached {seen} of {last} in {timeout_s}s")
        await asyncio.sleep(0.05 if prog is None else 0.2)


async def applied(nc: Any, settings: Settings, timeout_s: float = 60.0) -> None:
    """Until the features service has applied everything on the EVENTS stream (online)."""
    js = bus.jetstream(nc, settings)
    last = (await js.stream_info(EVENTS_STREAM)).state.last_seq
    deadline = time.monotonic() + timeout_s
    while (await health(nc, "features"))["position"] < last:
        if time.monotonic() > deadline:
            raise TimeoutError(f"features did not apply EVENTS up to {last} in {timeout_s}s")
        await asyncio.sleep(0.01)


async def wait_rows(nc: Any, query: str, at_least: int, timeout_s: float = 60.0) -> int:
    deadline = time.monotonic() + timeout_s
    while True:
        n = await count(nc, query)
        if n >= at_least or time.monotonic() > deadline:
            return n
        await asyncio.sleep(0.3)


async def stable_count(nc: Any, query: str, settle_s: float = 1.5) -> int:
    """A count that stopped growing (rows still on their way are waited for)."""
    n, since = -1, time.monotonic()
    deadline = time.monotonic() + 30.0
    while time.monotonic() < deadline:
        now = await count(nc, query)
        if now != n:
            n, since = now, time.monotonic()
        elif time.monotonic() - since >= settle_s:
            break
        await asyncio.sleep(0.3)
    return n
