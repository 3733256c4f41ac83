"""Read-only SQL against the warehouse service over NATS (for the CLI, the demo and the
services that do not own the warehouse)."""

from __future__ import annotations

import asyncio
import base64
import time
from typing import Any

import msgspec
import pyarrow as pa
from nats.aio.client import Client as NATS

from myelin import bus
from myelin.errors import MyelinError
from myelin.subjects import RPC_WAREHOUSE_QUERY, health_subject
from myelin.warehouse import ipc_to_arrow


async def query(
    nc: NATS, sql: str, *, max_rows: int = 10_000_000, timeout: float = 120.0
) -> pa.Table:
    raw = await bus.request(
        nc,
        RPC_WAREHOUSE_QUERY,
        {"sql": sql, "format": "arrow", "max_rows": max_rows},
        timeout=timeout,
    )
    table: pa.Table = ipc_to_arrow(base64.b64decode(msgspec.json.decode(raw)["arrow_b64"]))
    return table


async def query_rows(
    nc: NATS, sql: str, *, max_rows: int = 10_000, timeout: float = 120.0
) -> list[dict[str, Any]]:
    raw = await bus.request(
        nc, RPC_WAREHOUSE_QUERY, {"sql": sql, "max_rows": max_rows}, timeout=timeout
    )
    rows: list[dict[str, Any]] = msgspec.json.decode(raw)["data"]
    return rows


class NotStored(MyelinError):
    code = "not_stored"


async def stored_positions(nc: NATS) -> tuple[int, int]:
    """The stream sequences the warehouse has stored EVENTS and FEATURES up to."""
    h = msgspec.json.decode(await bus.request(nc, health_subject("warehouse"), {}, timeout=10))
    pos = h["positions"]
    return int(pos["warehouse-events"]), int(pos["warehouse-features"])


async def wait_stored(
    nc: NATS, *, events_seq: int = 0, features_seq: int = 0, timeout: float = 120.0
) -> None:
    """Until the warehouse has stored EVENTS up to ``events_seq`` and FEATURES up to
    ``features_seq`` (stream sequences)."""
    deadline = time.monotonic() + timeout
    while True:
        events, features = await stored_positions(nc)
        if events >= events_seq and features >= features_seq:
            return
        if time.monotonic() > deadline:
            raise NotStored(
                f"the warehouse stored EVENTS to {events} and FEATURES to {features}, "
                f"not {events_seq} and {features_seq}, in {timeout:.0f}s"
            )
        await asyncio.sleep(0.05)
