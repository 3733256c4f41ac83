"""Outbound adapter: the Redis online store (layout in :mod:`myelin.online`).

A batch is applied with one Lua call: per entity, the state and online vector are
written only if the batch's sequence for that entity is newer than the stored one, and
the view's position moves forward. A redelivered or replayed batch changes nothing.
"""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis

from myelin import online
from services.features.logic import EntityState
from services.features.views import FeatureView

APPLY_LUA = """
local pos = tonumber(redis.call('GET', KEYS[1]) or '0')
local ttl = tonumber(ARGV[2])
local a = 4
local applied = 0
for i = 1, tonumber(ARGV[3]) do
  local sk = KEYS[2 * i]
  local ok = KEYS[2 * i + 1]
  local seq = tonumber(ARGV[a])
  local nf = tonumber(ARGV[a + 2])
  local cur = tonumber(redis.call('HGET', sk, 'seq') or '0')
  if seq > cur then
    redis.call('HSET', sk, 'seq', ARGV[a], 'blob', ARGV[a + 1])
    redis.call('EXPIRE', sk, ttl)
    local args = {}
    for j = 1, nf * 2 do args[j] = ARGV[a + 2 + j] end
    redis.call('HSET', ok, unpack(args))
    redis.call('EXPIRE', ok, ttl)
    applied = applied + 1
  end
  a = a + 3 + nf * 2
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
            pipe.hget(online.state_key(self.view.name, e), "blob")
        blobs = await pipe.execute()
        return {e: EntityState.decode(b) for e, b in zip(entities, blobs, strict=True) if b}

    async def apply(self, updates: list[OnlineUpdate], last_seq: int) -> int:
        name, vhash = self.view.name, self.view.content_hash
        keys: list[str] = [online.position_key(name)]
        args: list[Any] = [last_seq, self.ttl_s, len(updates)]
        for u in updates:
            keys.append(online.state_key(name, u.entity))
            keys.append(online.online_key(name, u.entity))
            fields: list[Any] = []
            for k, val in u.values.items():
                fields += [k, repr(val)]
            fields += ["_as_of", u.as_of, "_seq", u.seq, "_trace", u.trace_id, "_view", vhash]
            args += [u.seq, u.state.encode(), len(fields) // 2, *fields]
        applied: int = await self._apply(keys=keys, args=args)
        return applied
