"""A lean Redis connection for the online read on the serving hot path.

redis-py's asyncio client costs ~250 us of CPU per command on this machine (connection
pool, retry and timeout wrappers, command packing in Python): more than the rest of a
Predict. This connection is one socket with requests pipelined on it, replies matched to
requests in order and parsed by hiredis (C), and one timer per command. It speaks only
what the read needs (commands in, RESP replies out), for ``redis://`` and ``unix://`` URLs
with an optional ACL user and password, and database.

A failed or timed-out connection fails every command waiting on it (their replies could
no longer be matched) and is replaced on the next command; a read is retried once on a
fresh connection, since reading changes nothing. What fails twice is
:class:`~myelin.errors.Retryable` (gRPC UNAVAILABLE).
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import deque
from typing import Any
from urllib.parse import unquote, urlparse

import hiredis

from myelin.errors import Retryable


class OnlineStoreUnavailable(Retryable):
    code = "online_store_unavailable"


class ReplyError(Exception):
    """Redis answered a command with an error."""


def encode(args: tuple[bytes | str | int, ...]) -> bytes:
    parts = [b"*%d\r\n" % len(args)]
    for a in args:
        b = a if isinstance(a, bytes) else str(a).encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(parts)


class _Protocol(asyncio.Protocol):
    def __init__(self, conn: _Connection) -> None:
        self._conn = conn

    def data_received(self, data: bytes) -> None:
        self._conn.feed(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self._conn.fail(ConnectionError(f"connection lost: {exc or 'closed by the server'}"))


class _Connection:
    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.transport: asyncio.Transport | None = None
        self.pending: deque[tuple[asyncio.Future[Any], asyncio.TimerHandle]] = deque()
        self.reader = hiredis.Reader()
        self.broken: Exception | None = None

    def send(self, args: tuple[bytes | str | int, ...]) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        timer = loop.call_later(self.timeout_s, self.fail, TimeoutError("no reply in time"))
        self.pending.append((future, timer))
        assert self.transport is not None
        self.transport.write(encode(args))
        return future

    def feed(self, data: bytes) -> None:
        self.reader.feed(data)
        while self.pending:
            reply = self.reader.gets()
            if reply is False:
                return
            future, timer = self.pending.popleft()
            timer.cancel()
            if future.done():
                continue
            if isinstance(reply, hiredis.ReplyError):
                future.set_exception(ReplyError(str(reply)))
            else:
                future.set_result(reply)

    def fail(self, exc: Exception) -> None:
        """The connection cannot be trusted any more: fail what waits, close it."""
        self.broken = exc
        while self.pending:
            future, timer = self.pending.popleft()
            timer.cancel()
            if not future.done():
                future.set_exception(exc)
        if self.transport is not None:
            self.transport.close()


class RedisWire:
    def __init__(self, url: str, timeout_s: float = 1.0) -> None:
        u = urlparse(url)
        if u.scheme not in ("redis", "unix"):
            raise ValueError(f"unsupported Redis URL scheme {u.scheme!r} (redis:// or unix://)")
        self._unix = u.path if u.scheme == "unix" else ""
        self._host = u.hostname or "127.0.0.1"
        self._port = u.port or 6379
        self._password = unquote(u.password) if u.password else ""
        self._username = unquote(u.username) if u.username and u.password else ""
        db = u.path.lstrip("/") if u.scheme == "redis" else ""
        if u.scheme == "unix":
            db = dict(p.split("=", 1) for p in u.query.split("&") if "=" in p).get("db", "")
        self._db = int(db) if db else 0
        self._timeout_s = timeout_s
        self._conn: _Connection | None = None
        self._lock = asyncio.Lock()
        self._shas: dict[str, str] = {}

    async def _connection(self) -> _Connection:
        conn = self._conn
        if conn is not None and conn.broken is None:
            return conn
        async with self._lock:
            if self._conn is not None and self._conn.broken is None:
                return self._conn
            conn = _Connection(self._timeout_s)
            loop = asyncio.get_running_loop()
            try:
                async with asyncio.timeout(self._timeout_s):
                    if self._unix:
                        transport, _ = await loop.create_unix_connection(
                            lambda: _Protocol(conn), self._unix
                        )
                    else:
                        transport, _ = await loop.create_connection(
                            lambda: _Protocol(conn), self._host, self._port
                        )
                    conn.transport = transport
                    if self._username:  # an ACL user (myelin.redis_users)
                        await conn.send(("AUTH", self._username, self._password))
                    elif self._password:
                        await conn.send(("AUTH", self._password))
                    if self._db:
                        await conn.send(("SELECT", self._db))
            except (OSError, TimeoutError, ReplyError) as exc:
                conn.fail(ConnectionError(str(exc)))
                raise OnlineStoreUnavailable(f"online store unreachable: {exc}") from None
            self._conn = conn
            return conn

    async def call(self, *args: bytes | str | int) -> Any:
        """One command; retried once on a fresh connection if the connection fails."""
        for attempt in (1, 2):
            conn = await self._connection()
            try:
                return await conn.send(args)
            except (ConnectionError, TimeoutError) as exc:
                if attempt == 2:
                    raise OnlineStoreUnavailable(f"online store unreachable: {exc}") from None
        raise AssertionError("unreachable")

    async def eval(self, script: str, keys: list[str], args: list[str]) -> Any:
        """``EVALSHA`` of ``script`` (loaded on first use, and again after a restart)."""
        sha = self._shas.get(script) or hashlib.sha1(script.encode()).hexdigest()  # noqa: S324
        self._shas[script] = sha
        try:
            return await self.call("EVALSHA", sha, len(keys), *keys, *args)
        except ReplyError as exc:
            if not str(exc).startswith("NOSCRIPT"):
                raise
        await self.call("SCRIPT", "LOAD", script)
        return await self.call("EVALSHA", sha, len(keys), *keys, *args)

    async def close(self) -> None:
        if self._conn is not None:
            self._conn.fail(ConnectionError("closed"))
            self._conn = None
