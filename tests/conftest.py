"""Fixtures that start real engines on free ports: nats-server, redis-server, chdb."""

from __future__ import annotations

import asyncio
import os
import sys
import threading
from collections.abc import AsyncIterator, Generator, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from nats.aio.client import Client as NATS

from myelin import bus
from myelin.settings import Settings
from myelin.stack.engines import NatsServer, RedisServer
from myelin.stack.process import free_port
from myelin.stack.supervisor import with_ports
from myelin.warehouse import ChdbWarehouse, Warehouse, open_warehouse

ROOT = Path(__file__).resolve().parents[1]


def _dump_tasks() -> None:
    """Where every asyncio task waits (pytest-timeout shows only the event loop's select)."""
    out = sys.stderr
    print("\n---- asyncio tasks still running near the test's timeout ----", file=out)
    for task in list(getattr(asyncio.tasks, "_all_tasks", ())):  # every loop's tasks
        if task.done():
            continue
        print(f"task {task.get_name()}:", file=out)
        awaited: Any = task.get_coro()
        while awaited is not None:  # the chain of awaits, outermost first
            frame = getattr(awaited, "cr_frame", None) or getattr(awaited, "gi_frame", None)
            if frame is None:
                print(f"  awaiting {awaited!r}", file=out)
                break
            print(f"  {frame.f_code.co_filename}:{frame.f_lineno} {frame.f_code.co_name}", file=out)
            awaited = getattr(awaited, "cr_await", None) or getattr(awaited, "gi_yieldfrom", None)
    out.flush()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, object, object]:
    """Shortly before pytest-timeout fails a test, print the stacks of its asyncio tasks:
    a hang in CI is then found from the log, not by reproducing it."""
    marker = item.get_closest_marker("timeout")
    limit = float(marker.args[0]) if marker and marker.args else item.config.getini("timeout")
    timer = threading.Timer(max(float(limit or 0) - 5, 1), _dump_tasks) if limit else None
    if timer is not None:
        timer.daemon = True
        timer.start()
    try:
        return (yield)
    finally:
        if timer is not None:
            timer.cancel()


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    base = replace(Settings.from_env(), state_dir=tmp_path / "state", policy_dir=ROOT / "policies")
    return with_ports(
        base,
        nats_port=free_port(),
        redis_port=free_port(),
        ingest_http_port=free_port(),
        inference_grpc_port=free_port(),
        warehouse_http_port=free_port(),
        ops_http_port=free_port(),
    )


@pytest.fixture
async def nats_server(settings: Settings) -> AsyncIterator[NatsServer]:
    async with NatsServer(settings.state_dir / "nats", settings.nats_port) as server:
        yield server


@pytest.fixture
async def redis_server(settings: Settings) -> AsyncIterator[RedisServer]:
    async with RedisServer(settings.state_dir / "redis", settings.redis_port) as server:
        yield server


@pytest.fixture
async def nc(nats_server: NatsServer, settings: Settings) -> AsyncIterator[NATS]:
    conn = await bus.connect(settings, "test", reconnect=False)
    await bus.provision(bus.jetstream(conn, settings), settings)
    try:
        yield conn
    finally:
        await conn.close()


@pytest.fixture
async def redis_client(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        yield client
    finally:
        await client.aclose()


_WAREHOUSE: Warehouse | None = None


@pytest.fixture(scope="session")
def _session_warehouse(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Warehouse]:
    # chdb is one engine per process: open it once for the whole test session.
    if os.environ.get("MYELIN_CLICKHOUSE_URL"):
        wh = open_warehouse(Settings.from_env())
    else:
        wh = ChdbWarehouse(tmp_path_factory.mktemp("chdb"))
        from myelin.warehouse import DDL

        for stmt in DDL:
            wh.command(stmt)
    yield wh
    wh.close()


@pytest.fixture
def warehouse(_session_warehouse: Warehouse) -> Warehouse:
    """The session's warehouse, emptied for this test."""
    for table in (
        "events",
        "feature_values",
        "inferences",
        "audit",
        "dead_letters",
        "drift_events",
    ):
        _session_warehouse.command(f"TRUNCATE TABLE IF EXISTS myelin.{table}")
    return _session_warehouse
