"""The async Python producer SDK.

    async with Producer(nats_url, producer_id="checkout") as producer:
        await producer.send("purchase", 2, {"user_id": "u1", "item_id": "i9", "amount": 12.5})

- validates each event locally against the contracts registry (NATS KV) before sending,
  raising :class:`InvalidEvent` at once, with the field that is wrong;
- batches (``batch_size`` events or ``linger_s``, whichever first) and sends batches over
  NATS request-reply to ingest;
- retries with the *same event ids* (so a retry is never stored twice) on timeouts and on
  back-pressure, honouring the server's ``retry_after``, for at most ``retry_horizon_s``
  (5 minutes: well inside the streams' 20-minute duplicate window);
- applies back-pressure to the caller: ``send`` waits while ``max_pending`` events are
  buffered;
- flushes on close. Events ingest rejected are kept in :attr:`Producer.rejected`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Mapping
from types import TracebackType
from typing import Any

import msgspec
import nats
from nats.aio.client import Client as NATS

from myelin import __version__, bus
from myelin.contracts.registry import ContractRegistry
from myelin.contracts.store import ContractStore
from myelin.errors import MyelinError, Overloaded, RemoteError, Retryable
from myelin.subjects import RPC_INGEST_PUBLISH


class InvalidEvent(MyelinError):
    code = "invalid_event"


class DeliveryFailed(MyelinError):
    code = "delivery_failed"


class Producer:
    def __init__(
        self,
        nats_url: str,
        *,
        producer_id: str,
        batch_size: int = 500,
        linger_s: float = 0.05,
        max_pending: int = 20_000,
        request_timeout_s: float = 10.0,
        retry_horizon_s: float = 300.0,
        validate: bool = True,
    ) -> None:
        self.nats_url = nats_url
        self.producer_id = producer_id
        self.batch_size = batch_size
        self.linger_s = linger_s
        self.max_pending = max_pending
        self.request_timeout_s = request_timeout_s
        self.retry_horizon_s = retry_horizon_s
        self.validate = validate
        self.rejected: list[dict[str, Any]] = []
        self.accepted = 0
        self.duplicates = 0
        self.retries = 0
        self._nc: NATS | None = None
        self._registry: ContractRegistry | None = None
        self._buffer: list[bytes] = []
        self._ids: list[str] = []
        self._space = asyncio.Condition()
        self._flusher: asyncio.Task[None] | None = None
        self._send_lock = asyncio.Lock()
        self._json = msgspec.json.Encoder()

    async def start(self) -> None:
        self._nc = await nats.connect(
            self.nats_url,
            name=f"myelin-sdk-{self.producer_id}",
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.5,
        )
        if self.validate:
            await self.refresh_contracts()
        self._flusher = asyncio.create_task(self._linger_loop(), name="myelin-sdk-linger")

    async def refresh_contracts(self) -> None:
        assert self._nc is not None
        self._registry = await ContractStore(self._nc.jetstream()).registry()

    def _check(self, type_: str, version: int, data: Mapping[str, Any]) -> None:
        reg = self._registry
        if reg is None:
            return
        contract = reg.get(type_, version)
        if contract is None:
            raise InvalidEvent(
                f"no contract {type_} v{version}; known: "
                + ", ".join(f"{t} v{reg.versions(t)}" for t in reg.types())
            )
        try:
            msgspec.convert(dict(data), contract.payload)
        except msgspec.ValidationError as exc:
            raise InvalidEvent(
                f"{type_} v{version}: {exc}".replace("at `$", "at `$.data")
            ) from None

    async def send(
        self,
        type_: str,
        version: int,
        data: Mapping[str, Any],
        *,
        event_id: str | None = None,
        event_time_ms: int | None = None,
        trace_id: str = "",
    ) -> str:
        """Queue one event; returns its id (generated when not given)."""
        if self.validate:
            self._check(type_, version, data)
        eid = event_id or uuid.uuid4().hex
        doc = {
            "event_id": eid,
            "type": type_,
            "schema_version": version,
            "event_time": event_time_ms if event_time_ms is not None else int(time.time() * 1000),
            "producer_id": self.producer_id,
            "client_version": f"myelin-sdk/{__version__}",
            "data": dict(data),
        }
        if trace_id:
            doc["trace_id"] = trace_id
        async with self._space:
            await self._space.wait_for(lambda: len(self._buffer) < self.max_pending)
            self._buffer.append(self._json.encode(doc))
            self._ids.append(eid)
            full = len(self._buffer) >= self.batch_size
        if full:
            await self._send_one_batch()
        return eid

    async def flush(self) -> None:
        while self._buffer:
            await self._send_one_batch()

    async def _linger_loop(self) -> None:
        while True:
            await asyncio.sleep(self.linger_s)
            if self._buffer:
                await self._send_one_batch()

    async def _send_one_batch(self) -> None:
        async with self._send_lock:
            async with self._space:
                items, ids = self._buffer[: self.batch_size], self._ids[: self.batch_size]
                if not items:
                    return
            await self._deliver(items, ids)
            async with self._space:
                del self._buffer[: len(items)]
                del self._ids[: len(ids)]
                self._space.notify_all()

    async def _deliver(self, items: list[bytes], ids: list[str]) -> None:
        assert self._nc is not None
        deadline = time.monotonic() + self.retry_horizon_s
        pending = list(range(len(items)))
        delay = 0.05
        while pending:
            body = b"[" + b",".join(items[i] for i in pending) + b"]"
            try:
                raw = await bus.request(
                    self._nc, RPC_INGEST_PUBLISH, body, timeout=self.request_timeout_s
                )
                res = msgspec.json.decode(raw)
            except RemoteError as exc:
                if exc.code != "overloaded":
                    raise DeliveryFailed(
                        f"ingest refused the batch: {exc.code}: {exc.message}"
                    ) from None
                ra = exc.details.get("retry_after", delay)
                wait = float(ra) if isinstance(ra, int | float) else delay
            except (Retryable, Overloaded) as exc:
                wait = delay if not isinstance(exc, Overloaded) else exc.retry_after
            else:
                self.accepted += res["accepted"]
                self.duplicates += res["duplicates"]
                retry_idx: list[int] = []
                for r in res["results"]:
                    original = pending[r["index"]]
                    if r["status"] == "rejected":
                        self.rejected.append({**r, "event_id": ids[original]})
                    elif r["status"] == "retry":
                        retry_idx.append(original)
                pending = retry_idx
                if not pending:
                    return
                wait = float(res.get("retry_after_s") or delay)
            self.retries += 1
            if time.monotonic() + wait > deadline:
                raise DeliveryFailed(
                    f"{len(pending)} events not delivered within {self.retry_horizon_s}s"
                )
            await asyncio.sleep(wait)
            delay = min(delay * 2, 5.0)

    async def close(self) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
            self._flusher = None
        if self._nc is not None:
            try:
                await self.flush()
            finally:
                await self._nc.drain()
                self._nc = None

    async def __aenter__(self) -> Producer:
        await self.start()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()
