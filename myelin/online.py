"""The online feature store contract: Redis key layout (versioned) and the batched reader.

Written only by the features service; read by inference (and anyone) through
:class:`OnlineReader`. Layout ``v4``; ``{version}`` is a feature view's content hash, so
two definitions of one view live side by side, and ``{p}`` is an EVENTS partition
(``myelin.events.<p>``; an entity's partition is ``crc32(entity id) mod partitions``):

- ``myelin:v4:view:{view}``                       hash: ``served`` (the version reads get
  unless they pin one)
- ``myelin:v4:version:{view}:{version}``          hash: ``features`` (comma list, the
  vector's order), ``ttl_s``, ``freshness_s``, ``definition`` (JSON), ``registered_ms``,
  ``partitions`` (how many the entities are spread over)
- ``myelin:v4:entities:{<view>:<version>:<p>}``   hash: entity id -> msgpack array ``[seq,
  as_of, trace, vec, state]``: the event sequence of the newest event applied, its event
  time (ms), its trace id, the vector (array of float64, one per feature) and the window
  state (opaque to readers).
- ``myelin:v4:position:{<view>:<version>:<p>}``   string: last stream sequence of partition
  ``p`` fully applied
- ``myelin:v4:watermarks:{<view>:<version>:<p>}`` hash: partition -> event-time watermark
  (ms); one field, ``p`` (a store of ``partitions`` 1 holds every partition's)

The braces are Redis Cluster hash tags: a partition's entities, position and watermark
share one slot, so the features worker that owns the partition writes a batch as one
MULTI/EXEC on one node, and a read is one HMGET per partition it touches. Partitions of
one version spread over the cluster's shards. The features service deletes entities
older than the view's TTL (reads enforce the TTL themselves, whether or not that sweep
has run).

(v1 kept one hash field per feature; v2 had one version per view and a hash per entity;
v3 one entities hash and one position per version: one writer, one Redis node. A stack
upgraded from v3 rebuilds v4 from the EVENTS stream on start, a backfill.)
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import math
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, cast

import msgspec
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from myelin.redis_wire import RedisWire
from myelin.subjects import partition_of

LAYOUT = "v4"
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


def connect(url: str, cluster: bool = False) -> aioredis.Redis:
    """A Redis client that survives a Redis restart; with ``cluster`` a Redis Cluster client
    (``url`` names any node: the client learns the slots and the other nodes from it).

    ``Redis.from_url`` retries nothing by default: after Redis restarts, the first command
    on each pooled connection fails with "Connection closed by server". This client
    reconnects and retries a command (up to 6 times, 50 ms doubling to 1 s) on connection
    errors and timeouts. A transaction holding a WATCH is not retried by redis-py (it raises
    ``WatchError``), so callers that WATCH still re-read before they write again.

    The cluster client is returned as the same type: the online store uses only what both
    offer (one-key commands, one-key scripts, non-transactional pipelines), and takes a
    transaction's connection through :func:`slot_connection`.
    """
    retry = Retry(ExponentialBackoff(cap=1.0, base=0.05), 6)
    errors: list[type[Exception]] = [RedisConnectionError, RedisTimeoutError]
    if cluster:
        return cast(aioredis.Redis, RedisCluster.from_url(url, retry=retry, retry_on_error=errors))
    return aioredis.Redis.from_url(url, retry=retry, retry_on_error=errors)


@contextlib.asynccontextmanager
async def slot_connection(client: aioredis.Redis, key: str) -> AsyncIterator[Any]:
    """A connection to the node that serves ``key``'s slot, for a WATCH / MULTI / EXEC
    transaction on keys of that slot (one hash tag). Disconnected if the block fails
    (whatever it was in the middle of, the next user starts clean)."""
    some: object = client  # connect() hands a cluster client out as Redis
    release: Callable[[Any], object]
    if isinstance(some, RedisCluster):
        node = some.get_node_from_key(key)
        if node is None:
            raise RedisConnectionError(f"no Redis Cluster node serves the slot of {key!r} now")
        conn, release = node.acquire_connection(), node.release
    else:
        pool = client.connection_pool
        conn = await pool.get_connection()  # type: ignore[no-untyped-call]
        release = pool.release
    try:
        yield conn
    except BaseException:
        await conn.disconnect()
        raise
    finally:
        done = release(conn)  # the pool's release is a coroutine, the cluster node's is not
        if inspect.isawaitable(done):
            await done


def view_key(view: str) -> str:
    return f"{PREFIX}:view:{view}"


def version_key(view: str, version: str) -> str:
    return f"{PREFIX}:version:{view}:{version}"


def partition_tag(view: str, version: str, partition: int) -> str:
    """The Redis Cluster hash tag of one partition of a view version (one slot)."""
    return f"{{{view}:{version}:{partition}}}"


def entities_key(view: str, version: str, partition: int) -> str:
    return f"{PREFIX}:entities:{partition_tag(view, version, partition)}"


def position_key(view: str, version: str, partition: int) -> str:
    return f"{PREFIX}:position:{partition_tag(view, version, partition)}"


def watermarks_key(view: str, version: str, partition: int) -> str:
    return f"{PREFIX}:watermarks:{partition_tag(view, version, partition)}"


def partition_keys(view: str, version: str, partitions: int) -> list[str]:
    """Every key of a view version's partitions (to delete a version)."""
    return [
        key(view, version, p)
        for p in range(partitions)
        for key in (entities_key, position_key, watermarks_key)
    ]


def encode_entity(seq: int, as_of: int, trace: str, vec: list[float], state: Any) -> bytes:
    """``state`` is any msgpack-encodable value (the writer's window state)."""
    return _enc.encode((seq, as_of, trace, vec, state))


def decode_entity(blob: bytes) -> EntityDoc:
    return _doc_dec.decode(blob)


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
    partitions: int


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


class LayoutMismatch(ValueError):
    """A view version's stored layout does not match this stack's settings."""


class OnlineReader:
    """Batched reads of online vectors: the served version (one HGET, unless pinned), then
    one HMGET per partition the entities fall in, all sent at once."""

    def __init__(self, client: aioredis.Redis, wire: RedisWire | None = None) -> None:
        """``wire``: a lean connection for the read itself (the serving hot path, a single
        Redis node); the client serves everything else."""
        self._r = client
        self._wire = wire
        self._meta: dict[tuple[str, str], ViewMeta] = {}  # versions are immutable

    async def served_version(self, view: str) -> str:
        if self._wire is not None:
            raw = await self._wire.call("HGET", view_key(view), "served")
        else:
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
            raise UnknownView(f"feature view {view}@{v} is not in the online store (retired?)")
        m = {_text(k): _text(val) for k, val in raw.items()}
        meta = ViewMeta(
            name=view,
            hash=v,
            features=tuple(m["features"].split(",")),
            ttl_s=float(m["ttl_s"]),
            freshness_s=float(m["freshness_s"]),
            partitions=int(m.get("partitions", "1")),
        )
        self._meta[(view, v)] = meta
        return meta

    async def _records(self, meta: ViewMeta, entities: list[str]) -> list[bytes | None]:
        """Each entity's stored record (None: absent), and whether the version still
        exists, read together."""
        groups: dict[int, list[int]] = {}
        n = meta.partitions
        for i, e in enumerate(entities):
            groups.setdefault(partition_of(e, n), []).append(i)
        exists_cmd: tuple[str, ...] = ("EXISTS", version_key(meta.name, meta.hash))
        cmds = [exists_cmd] + [
            ("HMGET", entities_key(meta.name, meta.hash, p), *(entities[i] for i in idx))
            for p, idx in groups.items()
        ]
        if self._wire is not None:
            wire = self._wire
            replies = await asyncio.gather(*(wire.call(*c) for c in cmds))
        else:
            async with self._r.pipeline(transaction=False) as pipe:
                for c in cmds:
                    pipe.execute_command(*c)
                replies = await pipe.execute()
        if not replies[0]:
            self._meta.pop((meta.name, meta.hash), None)
            raise UnknownView(
                f"feature view {meta.name}@{meta.hash} is not in the online store (retired?)"
            )
        out: list[bytes | None] = [None] * len(entities)
        for idx, got in zip(groups.values(), replies[1:], strict=True):
            for i, blob in zip(idx, got, strict=True):
                out[i] = blob
        return out

    async def read(
        self,
        view: str,
        entities: list[str],
        features: list[str] | None = None,
        now_ms: int | None = None,
        version: str | None = None,
    ) -> list[EntityVector]:
        """Vectors of ``entities`` from ``version`` (default: the served one)."""
        meta = await self.meta(view, version)
        got = meta.hash
        records = await self._records(meta, entities) if entities else []
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
