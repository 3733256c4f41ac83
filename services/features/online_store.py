"""Outbound adapter: the Redis online store (layout in :mod:`myelin.online`).

A batch is applied with one Lua call: per entity, the state and online vector are
written only if the batch's sequence for that entity is newer than the stored one, and
the view's position moves forward. A redelivered or replayed batch changes nothing.
"""

from __future__ import annotations

from typing import Any, Protocol

import msgspec
import redis.asyncio as aioredis

from myelin import online
from services.features.logic import EntityState
from services.features.views import FeatureView

_mp = msgspec.msgpack.Encoder()

APPLY_LUA = """
-- KEYS[1] = position, KEYS[2] = partition watermarks, KEYS[2 + i] = entity i's hash.
-- ARGV[1] = last stream sequence of the batch, ARGV[2] = ttl seconds,
-- ARGV[3] = msgpack [[[event_seq, as_of, trace], ...], [partition, watermark, ...]],
-- ARGV[2 + 2i] = entity i's vector, ARGV[3 + 2i] = its window state (binary blobs:
-- Redis' cmsgpack has no bin type). An entity is written only if its sequence is newer.
local pos = tonumber(redis.call('GET', KEYS[1]) or '0')
local ttl = tonumber(ARGV[2])
local doc = cmsgpack.unpack(ARGV[3])
local updates = doc[1]
if #doc[2] > 0 then redis.call('HSET', KEYS[2], unpack(doc[2])) end
local applied = 0
for i, u in ipairs(updates) do
  local k = KEYS[2 + i]
  local cur = tonumber(redis.call('HGET', k, 'seq') or '0')
  if u[1] > cur then
    redis.call('HSET', k, 'seq', u[1], 'as_of', u[2], 'trace', u[3], 'vec', ARGV[2 + 2 * i],
               'state', ARGV[3 + 2 * i])
    redis.call('EXPIRE', k, ttl)
    applied = applied + 1
  end
end
if tonumber(ARGV[1]) > pos then redis.call('SET', KEYS[1], ARGV[1]) end
return applied
"""


class OnlineUpdate:
    __slots__ = ("as_of", "entity", "seq", "state", "trace_id", "values")

    def __init__(
        self, entity: str, state: EntityState, values: dict[str, float], trace_id: str
    ) -> None:
        self.entity = entity
        self.state = state
        self.seq = state.seq
        self.as_of = state.watermark
        self.values = values
        self.trace_id = trace_id


class OnlineStore:
    def __init__(self, client: aioredis.Redis, view: FeatureView, ttl_s: int) -> None:
        self._r = client
        self.view = view
        self.ttl_s = max(ttl_s, view.ttl_s)
        self._apply: Any = client.register_script(APPLY_LUA)

    async def register_view(self) -> None:
        v = self.view
        await self._r.hset(
            online.view_key(v.name),
            mapping={
                "hash": v.content_hash,
                "features": ",".join(v.feature_names),
                "ttl_s": str(v.ttl_s),
                "freshness_s": str(v.freshness_s),
            },
        )

    async def position(self) -> int:
        raw = await self._r.get(online.position_key(self.view.name))
        return int(raw) if raw else 0

    async def load_states(self, entities: list[str]) -> dict[str, EntityState]:
        if not entities:
            return {}
        pipe = self._r.pipeline(transaction=False)
        for e in entities:
            pipe.hget(online.entity_key(self.view.name, e), "state")
        blobs = await pipe.execute()
        return {e: EntityState.decode(b) for e, b in zip(entities, blobs, strict=True) if b}

    async def watermarks(self) -> dict[int, int]:
        raw = await self._r.hgetall(online.watermarks_key(self.view.name))
        return {int(k): int(v) for k, v in raw.items()}

    async def apply(
        self, updates: list[OnlineUpdate], last_seq: int, watermarks: dict[int, int]
    ) -> int:
        name = self.view.name
        keys: list[str] = [online.position_key(name), online.watermarks_key(name)]
        meta: list[Any] = []
        blobs: list[bytes] = []
        for u in updates:
            keys.append(online.entity_key(name, u.entity))
            meta.append([u.seq, u.as_of, u.trace_id])
            blobs.append(online.encode_vector(list(u.values.values())))
            blobs.append(u.state.encode())
        wm = [x for kv in watermarks.items() for x in kv]
        applied: int = await self._apply(
            keys=keys, args=[last_seq, self.ttl_s, _mp.encode([meta, wm]), *blobs]
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
