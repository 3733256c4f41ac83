"""Outbound adapter: forgetting a data subject's online state (``myelin.rpc.features.erase``,
asked by governance's erasure). Every stored view version loses the entity's record, in
every partition (a hot key's events may be spread over several)."""

from __future__ import annotations

import asyncio
import contextlib

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from myelin.online import entities_key, version_key
from services.features.view_registry import ViewRegistry

# a batch that read the entity before the delete may still write it back once: the delete
# is repeated after the longest a batch takes to land
SECOND_PASS_S = 1.0


async def _delete(redis: aioredis.Redis, pairs: list[tuple[str, str]], entity: str) -> int:
    deleted = 0
    for view, version in pairs:
        raw = await redis.hget(version_key(view, version), "partitions")
        partitions = int(raw) if raw else 1
        for p in range(partitions):
            deleted += int(await redis.hdel(entities_key(view, version, p), entity))
    return deleted


async def erase_entity(redis: aioredis.Redis, registry: ViewRegistry, entity: str) -> int:
    """Delete ``entity`` from every stored version's online records; the entries deleted."""
    stored, _broken = await registry.versions()
    pairs = [(v.name, v.content_hash) for v in stored]
    deleted = await _delete(redis, pairs, entity)
    await asyncio.sleep(SECOND_PASS_S)
    deleted += await _delete(redis, pairs, entity)
    # the append-only file still holds the entity's past writes until it is rewritten
    with contextlib.suppress(RedisError):
        await redis.bgrewriteaof()
    return deleted
