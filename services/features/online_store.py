"""Outbound adapter: the Redis online store of one partition of a view version (layout
in :mod:`myelin.online`).

A batch (events of one partition) is applied as one MULTI/EXEC transaction on the
partition's slot: one HSET of the entity records (vector + window state), the partition's
watermark and position, all or nothing. The guard is the position, WATCHed and read
first: a batch whose last stream sequence is not beyond it was applied already (a
redelivery, a replay, or a worker that lost the partition to another) and changes
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
    """Another writer moved this partition's position during the batch (retried: the
    batch is re-read from the new position; the loop reports it if it keeps happening)."""

    code = "concurrent_writer"


class _Stored(msgspec.Struct, array_like=True):
    seq: int
    as_of: int
    trace: str
    vec: msgspec.Raw
    state: list[Any]


_stored = msgspec.msgpack.Decoder(_Stored)
# the served pointer swapped in one step (one key: a Redis Cluster runs it on its node)
_SWAP_LUA = """
local previous = redis.call('HGET', KEYS[1], 'served')
redis.call('HSET', KEYS[1], 'served', ARGV[1])
return previous
"""
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


def version_meta(view: FeatureView, partitions: int) -> dict[str, str]:
    return {
        "partitions": str(partitions),
        "features": ",".join(view.feature_names),
        "ttl_s": str(view.ttl_s),
        "freshness_s": str(view.freshness_s),
        "definition": json.dumps(view_doc(view), sort_keys=True),
        "registered_ms": str(int(time.time() * 1000)),
    }


class OnlineStore:
    """One partition of a view version (``partition`` of ``partitions``)."""

    def __init__(
        self,
        client: aioredis.Redis,
        view: FeatureView,
        ttl_s: int,
        partition: int = 0,
        partitions: int = 1,
    ) -> None:
        self._r = client
        self.view = view
        self.version = view.content_hash
        self.ttl_s = max(ttl_s, view.ttl_s)
        self.partition = partition
        self.partitions = partitions
        name = view.name
        self._entities = online.entities_key(name, self.version, partition)
        self._pos_key = online.position_key(name, self.version, partition)
        self._wm_key = online.watermarks_key(name, self.version, partition)
        self._cursor = 0  # where the TTL sweep resumes

    def for_partition(self, partition: int) -> OnlineStore:
        return OnlineStore(self._r, self.view, self.ttl_s, partition, self.partitions)

    async def register_view(self) -> None:
        """Record this version's metadata; the first version of a view is served at once
        (later ones wait for a promotion)."""
        v = self.view
        key = online.version_key(v.name, self.version)
        if not await self._r.exists(key):
            await self._r.hset(key, mapping=cast(Any, version_meta(v, self.partitions)))
        stored = await self._r.hget(key, "partitions")
        if stored is not None and int(stored) != self.partitions:
            raise online.LayoutMismatch(
                f"view {v.ref} was built over {int(stored)} partitions and this stack has "
                f"{self.partitions} (MYELIN_PARTITIONS): entities would be looked up in the "
                "wrong place. Keep MYELIN_PARTITIONS, or register the view again as a new "
                "version after changing it"
            )
        await self._r.hsetnx(online.view_key(v.name), "served", self.version)

    async def served(self) -> str:
        """The view's served version ('' if none)."""
        raw = await self._r.hget(online.view_key(self.view.name), "served")
        return raw.decode() if isinstance(raw, bytes) else (raw or "")

    async def promote(self) -> str:
        """Serve this version from now on (one atomic pointer swap); returns the previous."""
        previous = await self._r.eval(_SWAP_LUA, 1, online.view_key(self.view.name), self.version)
        return previous.decode() if isinstance(previous, bytes) else (previous or "")

    async def drop(self) -> None:
        """Delete this version's online data, every partition (the served pointer too, if
        it points here: only a failed version is dropped while served; the caller checks)."""
        name, v = self.view.name, self.version
        if await self.served() == v:
            await self._r.hdel(online.view_key(name), "served")
        for key in online.partition_keys(name, v, self.partitions):  # one slot each
            await self._r.delete(key)
        await self._r.delete(online.version_key(name, v))

    async def position(self) -> int:
        raw = await self._r.get(self._pos_key)
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
        raw = await self._r.hgetall(self._wm_key)
        return {int(k): int(v) for k, v in raw.items()}

    async def check_position(self, after: int) -> None:
        """:class:`ConcurrentWriter` when another writer has applied this partition beyond
        ``after`` (the caller's last batch): checked before a batch publishes its feature
        rows, so rows computed from stale states never go out."""
        raw = await self._r.get(self._pos_key)
        stored = int(raw) if raw else 0
        if stored > after:
            raise ConcurrentWriter(
                f"{self.view.name}@{self.version} partition {self.partition} is at stream "
                f"sequence {stored}, beyond this writer's {after}: another worker applied it "
                "meanwhile; re-reading its state"
            )

    async def apply(
        self, updates: list[OnlineUpdate], last_seq: int, watermarks: dict[int, int], after: int
    ) -> int:
        """Returns the entities written, or -1 when the batch was applied before.

        ``after``: the position the caller's states are at (its last batch). A stored
        position beyond it means another writer applied this partition meanwhile (a
        worker that held it while this one was paused): the caller's states are stale, so
        nothing is written and :class:`ConcurrentWriter` makes it re-read them and retry."""
        name = self.view.name
        pos_key = self._pos_key
        encode = online.encode_entity
        items: list[Any] = ["HSET", self._entities]
        for u in updates:
            items.append(u.entity)
            items.append(encode(u.seq, u.as_of, u.trace_id, u.values, u.state.encodable()))
        commands: list[tuple[Any, ...]] = [("MULTI",)]
        if updates:
            commands.append(tuple(items))
        if watermarks:
            commands.append(("HSET", self._wm_key, *(x for kv in watermarks.items() for x in kv)))
        commands += [("SET", pos_key, last_seq), ("EXEC",)]
        async with online.slot_connection(self._r, pos_key) as conn:
            await conn.send_packed_command(_pack(("WATCH", pos_key)) + _pack(("GET", pos_key)))
            await conn.read_response()
            raw = await conn.read_response()
            stored = int(raw) if raw else 0
            if last_seq <= stored or stored > after:
                await conn.send_packed_command(_pack(("UNWATCH",)))
                await conn.read_response()
                if stored > after:
                    raise ConcurrentWriter(
                        f"{name}@{self.version} partition {self.partition} is at stream "
                        f"sequence {stored}, beyond this writer's {after}: another worker "
                        "applied it meanwhile; re-reading its state"
                    )
                return -1
            await conn.send_packed_command(b"".join(_pack(c) for c in commands))
            for _ in commands[:-1]:
                await conn.read_response()  # OK / QUEUED (an error reply raises)
            if await conn.read_response() is None:  # EXEC: nil when the WATCH fired
                raise ConcurrentWriter(
                    f"the position of {name}@{self.version} partition {self.partition} "
                    "moved during the batch: another worker wrote it (a partition moving)"
                )
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

    async def check_position(self, after: int) -> None: ...

    async def apply(
        self, updates: list[OnlineUpdate], last_seq: int, watermarks: dict[int, int], after: int
    ) -> int: ...

    async def sweep(self, now_ms: int) -> int: ...


class MemoryStateStore:
    """States kept in this process only: used to recompute the offline store by replay
    (the online store, already at the stream head, is left alone)."""

    async def check_position(self, after: int) -> None:
        return None  # one writer: this process

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
        self, updates: list[OnlineUpdate], last_seq: int, watermarks: dict[int, int], after: int
    ) -> int:
        self._watermarks.update(watermarks)
        for u in updates:
            self._states[u.entity] = u.state
        self._position = max(self._position, last_seq)
        return len(updates)

    async def sweep(self, now_ms: int) -> int:
        return 0
