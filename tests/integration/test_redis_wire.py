"""The lean Redis connection of the serving hot path (myelin/redis_wire.py) against a real
redis-server: replies matched to pipelined requests, scripts loaded again after a flush,
a database and a password, errors, a server that goes away and comes back."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from myelin.online import OnlineReader
from myelin.redis_wire import OnlineStoreUnavailable, RedisWire, ReplyError, encode
from myelin.stack.engines import RedisServer
from myelin.stack.process import free_port

pytestmark = pytest.mark.integration


def test_commands_are_encoded_as_resp_arrays() -> None:
    assert encode(("SET", b"k\r\n", 12)) == b"*3\r\n$3\r\nSET\r\n$3\r\nk\r\n\r\n$2\r\n12\r\n"


async def test_pipelined_replies_reach_the_request_that_asked(
    redis_server: RedisServer, redis_client: aioredis.Redis
) -> None:
    await redis_client.mset({f"k{i}": f"v{i}" for i in range(500)})
    wire = RedisWire(redis_server.url)
    try:
        got = await asyncio.gather(*(wire.call("GET", f"k{i}") for i in range(500)))
        assert got == [f"v{i}".encode() for i in range(500)]
        assert await wire.call("HMGET", "absent", "a", "b") == [None, None]
        with pytest.raises(ReplyError, match="wrong number of arguments"):
            await wire.call("GET")
        assert await wire.call("GET", "k1") == b"v1"  # an error reply leaves it usable
    finally:
        await wire.close()


async def test_scripts_are_loaded_again_after_a_flush(
    redis_server: RedisServer, redis_client: aioredis.Redis
) -> None:
    wire = RedisWire(redis_server.url)
    script = "return {KEYS[1], ARGV[1]}"
    try:
        assert await wire.eval(script, ["a"], ["b"]) == [b"a", b"b"]
        await redis_client.script_flush()
        assert await wire.eval(script, ["c"], ["d"]) == [b"c", b"d"]
        with pytest.raises(ReplyError, match="ERR"):
            await wire.eval("return redis.call('NOPE')", [], [])
    finally:
        await wire.close()


async def test_the_online_read_is_the_same_through_either_client(
    redis_server: RedisServer, redis_client: aioredis.Redis
) -> None:
    """Entities written as the features service writes them, read by redis-py's script
    call and by the lean connection: the same vectors."""
    from myelin import online
    from myelin.subjects import partition_of

    await redis_client.hset(online.view_key("v"), "served", "h1")
    await redis_client.hset(
        online.version_key("v", "h1"),
        mapping={"features": "a,b", "ttl_s": "3600", "freshness_s": "60", "partitions": "4"},
    )
    await redis_client.hset(
        online.entities_key("v", "h1", partition_of("u1", 4)),
        mapping={"u1": online.encode_entity(3, 1000, "t", [1.0, 2.0], [])},
    )
    wire = RedisWire(redis_server.url)
    try:
        plain = await OnlineReader(redis_client).read("v", ["u1", "u2"], now_ms=5000)
        lean = await OnlineReader(redis_client, wire).read("v", ["u1", "u2"], now_ms=5000)
        assert lean == plain and lean[0].values == (1.0, 2.0) and lean[1].status == "MISSING"
    finally:
        await wire.close()


async def test_a_database_and_a_password_from_the_url(tmp_path: Path) -> None:
    port = free_port()
    async with RedisServer(tmp_path / "r", port) as server:
        admin = aioredis.Redis.from_url(server.url)
        await admin.config_set("requirepass", "s3cret")
        await admin.aclose()
        admin = aioredis.Redis.from_url(f"redis://:s3cret@127.0.0.1:{port}/3")
        await admin.set("k", "in db 3")
        wire = RedisWire(f"redis://:s3cret@127.0.0.1:{port}/3")
        try:
            assert await wire.call("GET", "k") == b"in db 3"
        finally:
            await wire.close()
            await admin.aclose()
        with pytest.raises(OnlineStoreUnavailable, match=r"WRONGPASS|invalid"):
            await RedisWire(f"redis://:wrong@127.0.0.1:{port}/0").call("PING")


async def test_a_server_that_goes_away_is_unavailable_then_used_again(tmp_path: Path) -> None:
    port = free_port()
    wire = RedisWire(f"redis://127.0.0.1:{port}/0", timeout_s=0.5)
    try:
        async with RedisServer(tmp_path / "r", port):
            assert await wire.call("PING") == b"PONG"
        with pytest.raises(OnlineStoreUnavailable, match="unreachable"):
            await wire.call("PING")
        async with RedisServer(tmp_path / "r", port):  # back: the next command reconnects
            assert await wire.call("PING") == b"PONG"
    finally:
        await wire.close()


def test_only_redis_urls() -> None:
    with pytest.raises(ValueError, match="scheme"):
        RedisWire("http://127.0.0.1:6379")
