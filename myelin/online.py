"""The online feature store contract: Redis key layout (versioned) and the batched reader.

Written only by the features service; read by inference (and anyone) through
:class:`OnlineReader`. Layout ``v3``; ``{version}`` is a feature view's content hash, so
two definitions of one view live side by side:

- ``myelin:v3:view:{view}``                       hash: ``served`` (the version reads get
  unless they pin one)
- ``myelin:v3:version:{view}:{version}``          hash: ``features`` (comma list, the
  vector's order), ``ttl_s``, ``freshness_s``, ``definition`` (JSON), ``registered_ms``
- ``myelin:v3:entities:{view}:{version}``        hash: entity id -> msgpack array ``[seq,
  as_of, trace, vec, state]``: the event sequence of the newest event applied, its event
  time (ms), its trace id, the vector (array of float64, one per feature) and the window
  state (opaque to readers). One hash per version: a batch is one HSET and a read one
  HMGET, whatever the number of entities.
  The features service deletes entities older than the view's TTL (reads enforce the
  TTL themselves, whether or not that sweep has run).
- ``myelin:v3:position:{view}:{version}``         string: last stream sequence fully applied
- ``myelin:v3:watermarks:{view}:{version}``       hash: partition -> event-time watermark (ms)

(v1 kept one hash field per feature; v2 had one version per view and a hash per entity.)
The read script builds the entities key from the served version: a view's keys must live
on one Redis node.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import msgspec
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from myelin.redis_wire import RedisWire

LAYOUT = "v3"
PREFIX = f"myelin:{LAYOUT}"
_enc = msgspec.msgpack.Encoder()


class EntityDoc(msgspec.Struct, array_like=True):
    """An entity's online record, as stored."""

    seq: int
    as_of: int
    trace: str
    vec: list[float]
    state: msgspec.Raw  # the features service's window state


_doc_dec = msgspec.msgpack.Decoder(EntityDoc)


def connect(url: str) -> aioredis.Redis:
    """A Redis client that survives a Redis restart.

    ``Redis.from_url`` retries nothing by default: after Redis restarts, the first command
    on each pooled connection fails with "Connection closed by server". This client
    reconnects and retries a command (up to 6 times, 50 ms doubling to 1 s) on connection
    errors and timeouts. A transaction holding a WATCH is not retried by redis-py (it raises
    ``WatchError``), so callers that WATCH still re-read before they write again.
    """
    return aioredis.Redis.from_url(
        url,
        retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), 6),
        retry_on_error=[RedisConnectionError, RedisTimeoutError],
    )


def view_key(view: str) -> str:
    return f"{PREFIX}:view:{view}"


def version_key(view: str, version: str) -> str:
    return f"{PREFIX}:version:{view}:{version}"


def entities_key(view: str, version: str) -> str:
    return f"{PREFIX}:entities:{view}:{version}"


def position_key(view: str, version: str) -> str:
    return f"{PREFIX}:position:{view}:{version}"


def watermarks_key(view: str, version: str) -> str:
    return f"{PREFIX}:watermarks:{view}:{version}"


def encode_entity(seq: int, as_of: int, trace: str, vec: list[float], state: Any) -> bytes:
    """``state`` is any msgpack-encodable value (the writer's window state)."""
    return _enc.encode((seq, as_of, trace, vec, state))


def decode_entity(blob: bytes) -> EntityDoc:
    return _doc_dec.decode(blob)


# KEYS[1] = the view key; ARGV[1] = version ('' = the served one), ARGV[2] = the view's
# entities key and ARGV[3] its version key, both without the version, ARGV[4..] = entity
# ids. Returns {version, records}, or {'', version} when there is no such version: the
# served version and its records are read in one atomic step, so a promotion never mixes
# versions within a read, and a retired version is an error, not a page of misses.
_READ_LUA = """
local v = ARGV[1]
if v == '' then v = redis.call('HGET', KEYS[1], 'served') end
if not v then return {'', ''} end
if redis.call('EXISTS', ARGV[3] .. v) == 0 then return {'', v} end
if #ARGV < 4 then return {v, {}} end
return {v, redis.call('HMGET', ARGV[2] .. v, unpack(ARGV, 4))}
"""
READ_CHUNK = 4000  # entity ids per script call (Lua's unpack is bounded by its C stack)


class Status(StrEnum):
    FRESH = "FRESH"
    STALE = "STALE"
    EXPIRED = "EXPIRED"
    MISSING = "MISSING"


@dataclass(frozen=True, slots=True)
class ViewMeta:
    name: str
    hash: str  # the version
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
    version: str = ""  # the view version it was read from


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

    def __init__(self, client: aioredis.Redis, wire: RedisWire | None = None) -> None:
        """``wire``: a lean connection for the read itself (the serving hot path); the
        client serves everything else."""
        self._r = client
        self._wire = wire
        self._meta: dict[tuple[str, str], ViewMeta] = {}  # versions are immutable
        # One server-side call for any number of entities: one command to pack, one reply
        # to parse (a pipeline of HMGETs costs ~35 us of client time per entity).
        self._mget: Any = client.register_script(_READ_LUA)

    async def _read_script(self, keys: list[str], args: list[str]) -> Any:
        if self._wire is not None:
            return await self._wire.eval(_READ_LUA, keys, args)
        return await self._mget(keys=keys, args=args)

    async def served_version(self, view: str) -> str:
        raw = await self._r.hget(view_key(view), "served")
        if raw is None:
            raise UnknownView(f"feature view {view!r} has no served version in the online store")
        return _text(raw)

    async def meta(self, view: str, version: str | None = None) -> ViewMeta:
        """A version's metadata (the served version's when ``version`` is None)."""
        v = version or await self.served_version(view)
        got = self._meta.get((view, v))
        if got is not None:
            return got
        raw = await self._r.hgetall(version_key(view, v))
        if not raw:
            raise UnknownView(f"feature view {view}@{v} is not registered in the online store")
        m = {_text(k): _text(val) for k, val in raw.items()}
        meta = ViewMeta(
            name=view,
            hash=v,
            features=tuple(m["features"].split(",")),
            ttl_s=float(m["ttl_s"]),
            freshness_s=float(m["freshness_s"]),
        )
        self._meta[(view, v)] = meta
        return meta

    async def read(
        self,
        view: str,
        entities: list[str],
        features: list[str] | None = None,
        now_ms: int | None = None,
        version: str | None = None,
    ) -> list[EntityVector]:
        """Vectors of ``entities`` from ``version`` (default: the served one)."""
        got = version or ""
        records: list[bytes | None] = []
        for at in range(0, max(len(entities), 1), READ_CHUNK):
            # later chunks pin the version the first one resolved
            reply = await self._read_script(
                [view_key(view)],
                [
                    got,
                    f"{PREFIX}:entities:{view}:",
                    f"{PREFIX}:version:{view}:",
                    *entities[at : at + READ_CHUNK],
                ],
            )
            if not _text(reply[0]):
                absent = _text(reply[1])
                raise UnknownView(
                    f"feature view {view}@{absent} is not in the online store (retired?)"
                    if absent
                    else f"feature view {view!r} has no served version in the online store"
                )
            got = _text(reply[0])
            records.extend(reply[1])
        meta = await self.meta(view, got)
        if features:
            missing = [f for f in features if f not in meta.features]
            if missing:
                raise UnknownView(f"view {view}@{got} has no feature(s) {missing}")
            pick: list[int] | None = [meta.features.index(f) for f in features]
        else:
            pick = None
        width = len(pick) if pick is not None else len(meta.features)
        now = now_ms if now_ms is not None else int(time.time() * 1000)
        out: list[EntityVector] = []
        nan_row = tuple(math.nan for _ in range(width))
        for e, blob in zip(entities, records, strict=True):
            if blob is None:
                out.append(EntityVector(e, nan_row, 0, -1, Status.MISSING, 0, "", got))
                continue
            doc = decode_entity(blob)
            age = max(0, now - doc.as_of)
            status = classify(age, meta, True)
            if status == Status.EXPIRED:
                values = nan_row
            elif pick is not None:
                values = tuple(doc.vec[i] for i in pick)
            else:
                values = tuple(doc.vec)
            out.append(EntityVector(e, values, doc.as_of, age, status, doc.seq, doc.trace, got))
        return out
