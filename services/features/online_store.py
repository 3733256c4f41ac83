"""Outbound adapter: the Redis online store (layout in :mod:`myelin.online`).

A batch is applied with one Lua call: the entity states, online vectors, partition
watermarks and the view version's position, all or nothing. The guard is the position:
a batch whose last stream sequence is not beyond it was applied already (a redelivery
or a replay) and changes nothing. The pipeline drops messages at or below the position
before computing, so a batch is either wholly new or wholly old.

Python's cost is per batch: one command with four arguments, whatever the number of
entities (their vectors and states travel as one concatenated string, cut in Lua).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from typing import Any, Protocol, cast

import msgspec
import redis.asyncio as aioredis

from myelin import online
from services.features.logic import EntityState
from services.features.views import FeatureView

_mp = msgspec.msgpack.Encoder()

APPLY_LUA = """
-- KEYS[1] = position, KEYS[2] = partition watermarks.
-- ARGV[1] = last stream sequence of the batch, ARGV[2] = ttl seconds, ARGV[3] = entity
-- key prefix, ARGV[4] = msgpack [[entity, record length], ...] then [partition,
-- watermark, ...], ARGV[5] = the entity records (layout in myelin.online), concatenated
-- (Redis' cmsgpack has no bin type for binary values).
local pos = tonumber(redis.call('GET', KEYS[1]) or '0')
if tonumber(ARGV[1]) <= pos then return -1 end
local ttl = ARGV[2]
local prefix = ARGV[3]
local doc = cmsgpack.unpack(ARGV[4])
local blobs = ARGV[5]
local at = 1
for _, u in ipairs(doc[1]) do
  redis.call('SET', prefix .. u[1], string.sub(blobs, at, at + u[2] - 1), 'EX', ttl)
  at = at + u[2]
end
if #doc[2] > 0 then redis.call('HSET', KEYS[2], unpack(doc[2])) end
redis.call('SET', KEYS[1], ARGV[1])
return #doc[1]
"""

LOAD_LUA = """
-- ARGV[1] = entity key prefix, ARGV[2..] = entity ids -> their records (or nil)
local out = {}
for i = 2, #ARGV do out[i - 1] = redis.call('GET', ARGV[1] .. ARGV[i]) end
return out
"""


class _Stored(msgspec.Struct, array_like=True):
    seq: int
    as_of: int
    trace: str
    vec: msgspec.Raw
    state: list[Any]


_stored = msgspec.msgpack.Decoder(_Stored)


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
        "definition": json.dumps(asdict(view), sort_keys=True),
        "registered_ms": str(int(time.time() * 1000)),
    }


class OnlineStore:
    def __init__(self, client: aioredis.Redis, view: FeatureView, ttl_s: int) -> None:
        self._r = client
        self.view = view
        self.version = view.content_hash
        self.ttl_s = max(ttl_s, view.ttl_s)
        self._prefix = online.entity_prefix(view.name, self.version)
        self._apply: Any = client.register_script(APPLY_LUA)
        self._load: Any = client.register_script(LOAD_LUA)

    async def register_view(self) -> None:
        """Record this version's metadata; the first version of a view is served at once
        (later ones wait for a promotion)."""
        v = self.view
        key = online.version_key(v.name, self.version)
        if not await self._r.exists(key):
            await self._r.hset(key, mapping=cast(Any, version_meta(v)))
        await self._r.hsetnx(online.view_key(v.name), "served", self.version)

    async def position(self) -> int:
        raw = await self._r.get(online.position_key(self.view.name, self.version))
        return int(raw) if raw else 0

    async def load_states(self, entities: list[str]) -> dict[str, EntityState]:
        if not entities:
            return {}
        blobs = await self._load(args=[self._prefix, *entities])
        return {
            e: EntityState.from_list(_stored.decode(b).state)
            for e, b in zip(entities, blobs, strict=True)
            if b
        }

    async def watermarks(self) -> dict[int, int]:
        raw = await self._r.hgetall(online.watermarks_key(self.view.name, self.version))
        return {int(k): int(v) for k, v in raw.items()}

    async def apply(
        self, updates: list[OnlineUpdate], last_seq: int, watermarks: dict[int, int]
    ) -> int:
        """Returns the entities written, or -1 when the batch was applied before."""
        name = self.view.name
        meta: list[Any] = []
        blobs: list[bytes] = []
        encode = online.encode_entity
        for u in updates:
            blob = encode(u.seq, u.as_of, u.trace_id, u.values, u.state.to_list())
            meta.append((u.entity, len(blob)))
            blobs.append(blob)
        wm = [x for kv in watermarks.items() for x in kv]
        applied: int = await self._apply(
            keys=[
                online.position_key(name, self.version),
                online.watermarks_key(name, self.version),
            ],
            args=[last_seq, self.ttl_s, self._prefix, _mp.encode([meta, wm]), b"".join(blobs)],
        )
        return applied


class StateStore(Protocol):
    """Where the pipeline keeps entity states and its position."""

    async def register_view(self) -> None: ...

    async def position(self) -> int: ...

    async def load_states(self, entities: list[str]) -> dict[str, EntityState]: ...

    async def watermarks(self) -> dict[int, int]: ...

    async def apply(
        self, updates: list[OnlineUpdate], last_seq: int, watermarks: dict[int, int]
    ) -> int: ...


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
