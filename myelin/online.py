"""The online feature store contract: Redis key layout (versioned) and the batched reader.

Written only by the features service; read by inference (and anyone) through
:class:`OnlineReader`. Layout ``v2``:

- ``myelin:v2:view:{view}``            hash: ``hash``, ``features`` (comma list, the vector's
  order), ``ttl_s``, ``freshness_s``
- ``myelin:v2:entity:{view}:{entity}`` hash: ``vec`` (msgpack array of float64, one per
  feature), ``as_of`` (event-time ms of the newest event applied), ``seq`` (its event
  sequence), ``trace`` (its trace id), ``state`` (window state, msgpack)
- ``myelin:v2:position:{view}``        string: last stream sequence fully applied
- ``myelin:v2:watermarks:{view}``      hash: partition -> event-time watermark (ms)

(v1 kept one hash field per feature; a vector as one field costs Redis far less to write.)
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import msgspec
import redis.asyncio as aioredis

LAYOUT = "v2"
PREFIX = f"myelin:{LAYOUT}"
_vec_enc = msgspec.msgpack.Encoder()
_vec_dec = msgspec.msgpack.Decoder(list[float])


def view_key(view: str) -> str:
    return f"{PREFIX}:view:{view}"


def entity_key(view: str, entity: str) -> str:
    return f"{PREFIX}:entity:{view}:{entity}"


def position_key(view: str) -> str:
    return f"{PREFIX}:position:{view}"


def watermarks_key(view: str) -> str:
    return f"{PREFIX}:watermarks:{view}"


def encode_vector(values: list[float]) -> bytes:
    return _vec_enc.encode([float(v) for v in values])


def decode_vector(blob: bytes) -> list[float]:
    return _vec_dec.decode(blob)


_READ_LUA = """
local out = {}
for i, key in ipairs(KEYS) do
  out[i] = redis.call('HMGET', key, 'vec', 'as_of', 'seq', 'trace')
end
return out
"""


class Status(StrEnum):
    FRESH = "FRESH"
    STALE = "STALE"
    EXPIRED = "EXPIRED"
    MISSING = "MISSING"


@dataclass(frozen=True, slots=True)
class ViewMeta:
    name: str
    hash: str
    features: tuple[str, ...]
    ttl_s: float
    freshness_s: float


@dataclass(frozen=True, slots=True)
class EntityVector:
    entity_id: str
    values: tuple[float, ...]  # NaN where missing or expired
    as_of_ms: int
    age_ms: int
    status: Status
    seq: int
    trace_id: str


def classify(age_ms: int, meta: ViewMeta, present: bool) -> Status:
    """TTL is enforced on read, not only by key expiry."""
    if not present:
        return Status.MISSING
    if age_ms > meta.ttl_s * 1000:
        return Status.EXPIRED
    if age_ms > meta.freshness_s * 1000:
        return Status.STALE
    return Status.FRESH


def _text(v: bytes | str) -> str:
    return v.decode() if isinstance(v, bytes) else v


class UnknownView(LookupError):
    pass


class OnlineReader:
    """Batched reads of online vectors: one Redis call for any number of entities."""

    def __init__(self, client: aioredis.Redis) -> None:
        self._r = client
        self._meta: dict[str, ViewMeta] = {}
        # One server-side call for any number of entities: one command to pack, one reply
        # to parse (a pipeline of HMGETs costs ~35 us of client time per entity).
        self._mget: Any = client.register_script(_READ_LUA)

    async def meta(self, view: str, *, refresh: bool = False) -> ViewMeta:
        if not refresh and view in self._meta:
            return self._meta[view]
        raw = await self._r.hgetall(view_key(view))
        if not raw:
            raise UnknownView(f"feature view {view!r} is not registered in the online store")
        m = {_text(k): _text(v) for k, v in raw.items()}
        meta = ViewMeta(
            name=view,
            hash=m["hash"],
            features=tuple(m["features"].split(",")),
            ttl_s=float(m["ttl_s"]),
            freshness_s=float(m["freshness_s"]),
        )
        self._meta[view] = meta
        return meta

    async def read(
        self,
        view: str,
        entities: list[str],
        features: list[str] | None = None,
        now_ms: int | None = None,
    ) -> list[EntityVector]:
        meta = await self.meta(view)
        if features:
            try:
                pick: list[int] | None = [meta.features.index(f) for f in features]
            except ValueError:
                meta = await self.meta(view, refresh=True)
                missing = [f for f in features if f not in meta.features]
                if missing:
                    raise UnknownView(f"view {view!r} has no feature(s) {missing}") from None
                pick = [meta.features.index(f) for f in features]
        else:
            pick = None
        width = len(pick) if pick is not None else len(meta.features)
        rows = await self._mget(keys=[entity_key(view, e) for e in entities])
        now = now_ms if now_ms is not None else int(time.time() * 1000)
        out: list[EntityVector] = []
        nan_row = tuple(math.nan for _ in range(width))
        for e, (vec, as_of_raw, seq_raw, trace) in zip(entities, rows, strict=True):
            present = as_of_raw is not None and vec is not None
            as_of = int(as_of_raw) if present else 0
            age = max(0, now - as_of) if present else -1
            status = classify(age, meta, present)
            if status in (Status.MISSING, Status.EXPIRED):
                values = nan_row
            else:
                full = decode_vector(vec)
                values = tuple(full[i] for i in pick) if pick is not None else tuple(full)
            out.append(
                EntityVector(
                    entity_id=e,
                    values=values,
                    as_of_ms=as_of,
                    age_ms=age,
                    status=status,
                    seq=int(seq_raw) if seq_raw is not None else 0,
                    trace_id=_text(trace) if trace is not None else "",
                )
            )
        return out
