"""Test helpers that build real artifacts (no mocks): ONNX models, registered versions."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any

import msgspec
import nats.errors
import numpy as np
import pyarrow as pa
from nats.aio.client import Client as NATS

from myelin import bus
from myelin.contracts import StreamEvent
from myelin.demo.trainer import Trained, train
from myelin.models import ModelRegistry, Provenance
from myelin.records import AuditRecord
from myelin.settings import Settings
from myelin.sql_client import wait_stored
from myelin.subjects import (
    AUDIT_STREAM,
    EVENTS_STREAM,
    FEATURES_STREAM,
    RPC_WAREHOUSE_QUERY,
    health_subject,
)
from services.features.views import USER_ACTIVITY

FEATURES = list(USER_ACTIVITY.feature_names)


# A day boundary 30 days back: fixed event times in tests stay inside every retention
# (myelin/retention.py; the warehouse tables have TTLs), whatever day the suite runs.
RECENT_DAY_MS = (int(time.time() * 1000) // 86_400_000 - 30) * 86_400_000


def tiny_model(seed: int = 0, rows: int = 2000) -> Trained:
    rng = np.random.default_rng(seed)
    cols = {f: rng.poisson(3, rows).astype(np.float64) for f in FEATURES}
    logit = 0.8 * cols["clicks_1h"] - 0.3 * cols["impressions_1h"] + rng.normal(0, 1, rows)
    table = pa.table(
        {
            **cols,
            "label": (logit > 0).astype(np.int64),
            "ts": pa.array(np.arange(rows) * 1000, pa.timestamp("ms")),
        }
    )
    return train(table, FEATURES)


async def register(
    nc: NATS,
    settings: Settings,
    t: Trained,
    *,
    alias: str | None = "champion",
    labels: dict[str, str] | None = None,
    provenance: bool = True,
    reference: bool = True,
) -> int:
    reg = ModelRegistry(nc, bus.jetstream(nc, settings))
    prov = (
        Provenance(
            training_window=list(t.window),
            feature_views=[f"user_activity@{USER_ACTIVITY.content_hash}"],
            feature_view="user_activity",
            features=t.features,
            training_rows=t.train_rows,
        )
        if provenance
        else Provenance()
    )
    mv = await reg.register(
        "ctr",
        t.onnx,
        inputs=t.inputs,
        outputs=t.outputs,
        provenance=prov,
        metrics=t.metrics,
        labels=labels,
        reference=t.reference if reference else None,
    )
    if alias:
        await reg.set_alias("ctr", alias, mv.version, requester="test")
    return mv.version


def clickstream(
    n: int,
    *,
    prefix: str,
    now_ms: int,
    users: int,
    items: int,
    ago_ms: int,
    step_ms: int,
    types: tuple[str, ...] = ("click", "impression", "purchase"),
    amount: Callable[[int], float] = lambda _i: 2.0,
    start: int = 0,
) -> list[dict[str, Any]]:
    """Ingest-ready JSON events ``start .. start + n - 1``, one every ``step_ms`` from
    ``ago_ms`` before ``now_ms``; purchases carry ``amount(i)``."""
    return [
        {
            "event_id": f"{prefix}{i}",
            "type": types[i % len(types)],
            "schema_version": 1,
            "event_time": now_ms - ago_ms + i * step_ms,
            "data": {
                "user_id": f"u{i % users}",
                "item_id": f"i{i % items}",
                **({"amount": amount(i)} if types[i % len(types)] == "purchase" else {}),
            },
        }
        for i in range(start, start + n)
    ]


async def wait_caught_up(nc: NATS, settings: Settings, timeout: float = 60.0) -> int:
    """Until the features service has applied the whole EVENTS stream and the warehouse
    has stored it (raw events and feature rows); returns the stream's last sequence."""
    js = bus.jetstream(nc, settings)
    last = int((await js.stream_info(EVENTS_STREAM)).state.last_seq)
    deadline = time.monotonic() + timeout
    while True:
        h = msgspec.json.decode(await bus.request(nc, health_subject("features"), {}))
        if h["position"] >= last:
            break
        assert time.monotonic() < deadline, f"features at {h['position']} of {last}"
        await asyncio.sleep(0.1)
    features_last = (await js.stream_info(FEATURES_STREAM)).state.last_seq
    await wait_stored(nc, events_seq=last, features_seq=features_last, timeout=timeout)
    return last


async def offline_counts(nc: NATS) -> dict[str, int]:
    """Raw events and feature rows in ClickHouse (deduplicated)."""
    q = (
        "SELECT (SELECT count() FROM myelin.events FINAL) AS events, "
        "(SELECT count() FROM myelin.feature_values FINAL) AS fv"
    )
    [row] = msgspec.json.decode(await bus.request(nc, RPC_WAREHOUSE_QUERY, {"sql": q}))["data"]
    return {k: int(v) for k, v in row.items()}


def stream_event(
    event_id: str, user: str, t: int, *, typ: str = "click", partition: int = 0, **data: Any
) -> StreamEvent:
    """An event as ingest stores it on the EVENTS stream (what features and the warehouse
    consume), for tests that publish to the stream or feed the pipeline directly."""
    return StreamEvent(
        event_id=event_id,
        type=typ,
        schema_version=1,
        event_time=t,
        ingest_time=t,
        producer_id="p",
        client_version="",
        trace_id="",
        entity_id=user,
        partition=partition,
        data=msgspec.Raw(msgspec.msgpack.encode({"user_id": user, "item_id": "i", **data})),
    )


async def seed_online_features(
    nc: NATS, settings: Settings, redis_client: Any, *, users: int = 5, events: int = 40
) -> None:
    """Real online features for users u0..u{users-1}, through the features pipeline: every
    third event a click, the others impressions, in the last minute."""
    from myelin.contracts import default_registry
    from services.features.feature_rows import rows_publisher
    from services.features.logic import WindowEngine
    from services.features.online_store import OnlineStore
    from services.features.pipeline import FeaturePipeline

    mp = msgspec.msgpack.Encoder()
    now = int(time.time() * 1000)
    p = FeaturePipeline(
        WindowEngine(USER_ACTIVITY),
        default_registry(),
        OnlineStore(redis_client, USER_ACTIVITY, 3600),
        rows_publisher(bus.Publisher(bus.jetstream(nc, settings), settings)),
    )
    await p.start()
    batch = []
    for i in range(events):
        user = f"u{i % users}"
        ev = StreamEvent(
            event_id=f"e{i}",
            type="click" if i % 3 == 0 else "impression",
            schema_version=1,
            event_time=now - 60_000 + i,
            ingest_time=now,
            producer_id="t",
            client_version="",
            trace_id=f"{i + 1:032x}",
            entity_id=user,
            partition=0,
            data=msgspec.Raw(mp.encode({"user_id": user, "item_id": "x"})),
        )
        batch.append((i + 1, mp.encode([ev])))
    await p.process(batch)


async def audit_records(settings: Settings, action: str) -> list[AuditRecord]:
    """Every audit record of ``action`` on the AUDIT stream so far (read as admin)."""
    nc = await bus.connect(settings, "test-audit", reconnect=False, identity="admin")
    try:
        sub = await nc.jetstream().pull_subscribe(f"myelin.audit.{action}", stream=AUDIT_STREAM)
        out: list[AuditRecord] = []
        with contextlib.suppress(nats.errors.TimeoutError):
            while True:
                for m in await sub.fetch(100, timeout=0.5):
                    out.append(msgspec.msgpack.decode(m.data, type=AuditRecord))
        await sub.unsubscribe()
        return out
    finally:
        await nc.close()
