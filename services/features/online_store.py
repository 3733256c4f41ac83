"""Outbound adapter: the Redis online store (layout in :mod:`myelin.online`).

A batch is applied as one MULTI/EXEC transaction: one HSET of the entity records (vector
+ window state), the partition watermarks and the view version's position, all or
nothing. The guard is the position, WATCHed and read first: a batch whose last stream
sequence is not beyond it was applied already (a redelivery or a replay) and changes
nothing. The pipeline drops messages at or below the position before computing, so a
batch is either wholly new or wholly old.

Python's cost is per batch: the transaction is packed by hiredis (C) and sent on one
connection; redis-py's own packing cost ~4 us per entity. A Lua script was slower still:
every record cut from an argument becomes an interned Lua string, and records of one
layout collide in Lua 5.1's sampled string hash (~15 us each). Entities past the TTL are
deleted by a sweep that scans the records' ``as_of`` a slice at a time.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any, Protocol, cast

import hiredis
import msgspec
import redis.asyncio as aioredis

from myelin import online
from myelin.errors import Retryable
from services.features.logic import EntityState
from services.features.views import FeatureView, view_doc


class ConcurrentWriter(Retryable):
    """Another writer moved this view version's position during the batch (retried: the
    batch is re-read from the new position; the loop reports it if it keeps happening)."""

    code = "concurrent_writer"


class _Stored(msgspec.Struct, array_like=True):
    seq: int
    as_of: int
    trace: str
    vec: msgspec.Raw
    state: list[Any]


_stored = msgspec.msgpack.Decoder(_Stored)
_pack = cast(Callable[[tuple[Any, ...]], bytes], hiredis.pack_command)  # its stub takes 1-tuples


class _AsOf(msgspec.Struct, array_like=True):
    seq: int
    as_of: int  # the rest of the record is not decoded


_as_of = msgspec.msgpack.Decoder(_AsOf)


class OnlineUpdate:
    __slots__ = ("as_of", "entity", "seq", "state", "trace_id", "values")

    def __init__(self, entity: str, state: EntityState, values: list[float], trace_id: str) -> None:
        self.entity = entity
        self.state = state
        self.seq = state.seq
        self.as_of = state.watermark
        self.values = values  # in the view's feature order
        self.trace_id = trace_id


def version_meta(view: FeatureView) -> dict[str, str]:
    return {
        "features": ",".join(view.feature_names),
        "ttl_s": str(view.ttl_s),
        "freshness_s": str(view.freshness_s),
        "definition": json.dumps(view_doc(view), sort_keys=True),
        "registered_ms": str(int(time.time() * 1000)),
    }


class OnlineStore:
    def __init__(self, client: aioredis.Redis, view: FeatureView, ttl_s: int) -> None:
        self._r = client
        self.view = view
        self.version = view.content_hash
        self.ttl_s = max(ttl_s, view.ttl_s)
        self._entities = online.entities_key(view.name, self.version)
        self._cursor = 0  # where the TTL sweep resumes

    async def register_view(self) -> None:
        """Record this version's metadata; the first version of a view is served at once
        (later ones wait for a promotion)."""
        v = self.view
        key = online.version_key(v.name, self.version)
        if not await self._r.exists(key):
            await self._r.hset(key, mapping=cast(Any, version_meta(v)))
        await self._r.hsetnx(online.view_key(v.name), "served", self.version)

    async def served(self) -> str:
        """The view's served version ('' if none)."""
        raw = await self._r.hget(online.view_key(self.view.name), "served")
        return raw.decode() if isinstance(raw, bytes) else (raw or "")

    async def promote(self) -> str:
        """Serve this version from now on (one atomic pointer swap); returns the previous."""
        key = online.view_key(self.view.name)
        async with self._r.pipeline(transaction=True) as pipe:
            pipe.hget(key, "served")
            pipe.hset(key, "served", self.version)
            previous, _ = await pipe.execute()
        return previous.decode() if isinstance(previous, bytes) else (previous or "")

    async def drop(self) -> None:
        """Delete this version's online data (the served pointer too, if it points here:
        only a failed version is dropped while served; the caller checks)."""
        name, v = self.view.name, self.version
        if await self.served() == v:
            await self._r.hdel(online.view_key(name), "served")
        await self._r.delete(
            self._entities,
            online.position_key(name, v),
            online.watermarks_key(name, v),
            online.version_key(name, v),
        )

    async def position(self) -> int:
        raw = await self._r.get(online.position_key(self.view.name, self.version))
        return int(raw) if raw else 0

    async def load_states(self, entities: list[str]) -> dict[str, EntityState]:
        if not entities:
            return {}
        blobs = await self._r.hmget(self._entities, entities)
        return {
            e: EntityState.from_list(_stored.decode(b).state)
            for e, b in zip(entities, blobs, strict=True)
            if isinstance(b, bytes)
        }

    async def watermarks(self) -> dict[int, int]:
        raw = await self._r.hgetall(online.watermarks_key(self.view.name, self.version))
        return {int(k): int(v) for k, v in raw.items()}

    async def apply(
        self, updates: list[OnlineUpdate], last_seq: int, watermarks: dict[int, int]
    ) -> int:
        """Returns the entities written, or -1 when the batch was applied before."""
        name = self.view.name
        pos_key = online.position_key(name, self.version)
        encode = online.encode_entity
        items: list[Any] = ["HSET", self._entities]
        for u in updates:
            items.append(u.entity)
            items.append(encode(u.seq, u.as_of, u.trace_id, u.values, u.state.encodable()))
        commands: list[tuple[Any, ...]] = [("MULTI",)]
        if updates:
            commands.append(tuple(items))
        if watermarks:
            wm_key = online.watermarks_key(name, self.version)
            commands.append(("HSET", wm_key, *(x for kv in watermarks.items() for x in kv)))
        commands += [("SET", pos_key, last_seq), ("EXEC",)]
        pool = self._r.connection_pool
        conn = await pool.get_connection()  # type: ignore[no-untyped-call]
        try:
            await conn.send_packed_command(_pack(("WATCH", pos_key)) + _pack(("GET", pos_key)))
            await conn.read_response()
            raw = await conn.read_response()
            if last_seq <= (int(raw) if raw else 0):
                await conn.send_packed_command(_pack(("UNWATCH",)))
                await conn.read_response()
                return -1
            await conn.send_packed_command(b"".join(_pack(c) for c in commands))
            for _ in commands[:-1]:
                await conn.read_response()  # OK / QUEUED (an error reply raises)
            if await conn.read_response() is None:  # EXEC: nil when the WATCH fired
                raise ConcurrentWriter(
                    f"the position of {name}@{self.version} moved during the batch: "
                    "is a second features process running this view?"
                )
        except BaseException:
            await conn.disconnect()  # whatever it was in the middle of, it starts clean
            raise
        finally:
            await pool.release(conn)
        return len(updates)

    async def sweep(self, now_ms: int, count: int = 10_000) -> int:
        """Delete entities whose newest event is older than the TTL, scanning a slice of the
        records per call (it resumes where the last call stopped); returns how many."""
        cutoff = now_ms - self.view.ttl_s * 1000
        self._cursor, fields = await self._r.hscan(self._entities, cursor=self._cursor, count=count)
        records = cast(dict[bytes, bytes], fields)
        old = [k for k, v in records.items() if _as_of.decode(v).as_of < cutoff]
        if old:
            await self._r.hdel(self._entities, *old)
        return len(old)


class StateStore(Protocol):
    """Where the pipeline keeps entity states and its position."""

    async def register_view(self) -> None: ...

    async def position(self) -> int: ...

    async def load_states(self, entities: list[str]) -> dict[str, EntityState]: ...

    async def watermarks(self) -> dict[int, int]: ...

    async def apply(
        self, updates: list[OnlineUpdate], last_seq: int, watermarks: dict[int, int]
    ) -> int: ...

    async def sweep(self, now_ms: int) -> int: ...


class MemoryStateStore:
    """States kept in this process only: used to recompute the offline store by replay
    (the online store, already at the stream head, is left alone)."""

    def __init__(self) -> None:
        self._states: dict[str, EntityState] = {}
        self._position = 0
        self._watermarks: dict[int, int] = {}

    async def register_view(self) -> None:
        return None

    async def position(self) -> int:
        return self._position

    async def load_states(self, entities: list[str]) -> dict[str, EntityState]:
        return {e: self._states[e].copy() for e in entities if e in self._states}

    async def watermarks(self) -> dict[int, int]:
        return dict(self._watermarks)

    async def apply(
        self, updates: list[OnlineUpdate], last_seq: int, watermarks: dict[int, int]
    ) -> int:
        self._watermarks.update(watermarks)
        for u in updates:
            self._states[u.entity] = u.state
        self._position = max(self._position, last_seq)
        return len(updates)

    async def sweep(self, now_ms: int) -> int:
        return 0
