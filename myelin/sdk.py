"""The async Python producer SDK.

    async with Producer(nats_url, producer_id="checkout", nkey_file="producer.nk") as producer:
        await producer.send("purchase", 2, {"user_id": "u1", "item_id": "i9", "amount": 12.5})

- connects as the producer's NATS identity (``nkey_file``); behind an authenticating
  server ingest stamps that identity, not the ``producer_id`` given here, on every event;

- validates each event locally against the contracts registry (NATS KV) before sending,
  raising :class:`InvalidEvent` at once, with the field that is wrong;
- refuses, whether ``validate`` is on or not, any value that has no faithful JSON form,
  raising :class:`UnencodableEvent` (an :class:`InvalidEvent`) with its path, e.g.
  ``$.data.user_id``: a string that is not valid Unicode (a lone surrogate such as
  ``"\ud800"``, which UTF-8 cannot encode), a key that is not a string, ``bytes``, a NaN
  or infinite float (JSON has neither; it would be sent as ``null``), an int outside the
  64-bit range events are stored in, nesting deeper than :data:`MAX_DEPTH` (the envelope
  is the first level), or a type the encoder does not know. Such an event is never
  queued: what was queued before it is sent as it is, and ``send`` can be called again;
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
import math
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import msgspec
import nats
from nats.aio.client import Client as NATS

from myelin import __version__, bus
from myelin.contracts.registry import ContractRegistry
from myelin.contracts.store import ContractStore
from myelin.errors import MyelinError, Overloaded, RemoteError, Retryable
from myelin.nats_identity import ANONYMOUS, check_identity, inbox_prefix
from myelin.subjects import RPC_INGEST_PUBLISH
from myelin.tasks import cancel_and_wait

#: How deep a value may nest (contracts have flat fields; this only bounds the checks).
MAX_DEPTH = 32
_INT_MIN, _INT_MAX = -(2**63), 2**64 - 1  # what msgpack, the stored form, can hold


class InvalidEvent(MyelinError):
    """The event breaks its contract, or there is no such contract; the message names the
    field (``$.data.amount``). Nothing of the event was queued."""

    code = "invalid_event"


class UnencodableEvent(InvalidEvent):
    """A value of the event has no faithful JSON form (see the module docstring); the
    message starts with its path (``$.data.user_id``, ``$.event_id``, ``$.data.x[2]``)
    and says what is wrong. Raised whether or not the producer validates; nothing was
    queued. ``details["path"]`` holds the path."""

    code = "unencodable_event"


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
        nkey_file: str | Path | None = None,
    ) -> None:
        """``nkey_file``: the producer's NATS credential, a seed file named
        ``<identity>.nk`` (``myelin up`` writes ``producer.nk`` under
        ``.myelin/security/nats/``); behind an authenticating server, ingest stamps that
        identity on every event as its ``producer_id``."""
        self.nats_url = nats_url
        self.producer_id = producer_id
        self.batch_size = batch_size
        self.linger_s = linger_s
        self.max_pending = max_pending
        self.request_timeout_s = request_timeout_s
        self.retry_horizon_s = retry_horizon_s
        self.validate = validate
        self.nkey_file = Path(nkey_file) if nkey_file is not None else None
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
        auth: dict[str, Any] = {}
        identity = ANONYMOUS
        if self.nkey_file is not None:
            identity = check_identity(self.nkey_file.name.removesuffix(".nk"))
            auth = {"nkeys_seed": str(self.nkey_file), "inbox_prefix": inbox_prefix(identity)}
        self._nc = bus.remember_identity(
            await nats.connect(
                self.nats_url,
                **auth,
                name=f"myelin-sdk-{self.producer_id}",
                max_reconnect_attempts=-1,
                reconnect_time_wait=0.5,
            ),
            identity,
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
        except (TypeError, ValueError, OverflowError, RecursionError) as exc:
            raise InvalidEvent(f"{type_} v{version}: data: {type(exc).__name__}: {exc}") from None

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
        """Queue one event; returns its id (generated when not given).

        Raises :class:`UnencodableEvent` for a value JSON cannot carry as it is and, with
        ``validate``, :class:`InvalidEvent` for an event its contract refuses; either way
        nothing of the event is queued. Ingest's own verdict on a queued event arrives
        later (:attr:`rejected`)."""
        if not isinstance(data, Mapping):
            raise InvalidEvent(f"data must be a mapping of field names, not {type(data).__name__}")
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
        encoded = self._encode(doc)
        if self.validate:
            self._check(type_, version, data)
        async with self._space:
            await self._space.wait_for(lambda: len(self._buffer) < self.max_pending)
            self._buffer.append(encoded)
            self._ids.append(eid)
            full = len(self._buffer) >= self.batch_size
        if full:
            await self._send_one_batch()
        return eid

    def _encode(self, doc: dict[str, Any]) -> bytes:
        """The event as JSON, or :class:`UnencodableEvent`. The encoder fails on strings
        that are not valid Unicode, on types it does not know and on extreme nesting; what
        it would change silently (NaN and infinities become ``null``, bytes base64 text,
        numeric keys strings) and ints beyond 64 bits are looked for only when the cheap
        signs are there (``null`` in the output, a non-scalar or big value in ``data``)."""
        try:
            encoded = self._json.encode(doc)
        except (TypeError, ValueError, OverflowError, RecursionError) as exc:
            found = _unencodable(doc)
            steps, what = found if found is not None else (_first_foreign(doc) or [], str(exc))
            path = _path(steps)
            raise UnencodableEvent(f"{path}: {what}", path=path) from None
        if b"null" in encoded or _suspect(doc["data"]):
            found = _unencodable(doc)
            if found is not None:
                path = _path(found[0])
                raise UnencodableEvent(f"{path}: {found[1]}", path=path)
        return encoded

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
            await cancel_and_wait(self._flusher)
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


def _unencodable(value: object, depth: int = 0) -> tuple[list[str | int], str] | None:
    """The first value (in order) JSON cannot carry as it is: its path (innermost step
    first) and what is wrong; None when there is none. Types it does not know are left to
    the encoder (:func:`_first_foreign` names them). Paths are built only for a problem."""
    if isinstance(value, str):
        return None if value.isascii() else _bad_text(value)
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int):
        return None if _INT_MIN <= value <= _INT_MAX else _too_big()
    if isinstance(value, float):
        return None if math.isfinite(value) else _non_finite(value)
    if isinstance(value, bytes | bytearray | memoryview):
        return [], "bytes have no JSON form: decode them to str first"
    if isinstance(value, Mapping | list | tuple):
        if depth >= MAX_DEPTH:
            return [], f"nested more than {MAX_DEPTH} levels deep"
        if isinstance(value, Mapping):
            for k, v in value.items():
                if not isinstance(k, str):
                    return [], f"the key {k!r} is not a string (JSON object keys are)"
                found = (None if k.isascii() else _bad_text(k)) or _unencodable(v, depth + 1)
                if found is not None:
                    found[0].append(k)
                    return found
        else:
            for i, v in enumerate(value):
                found = _unencodable(v, depth + 1)
                if found is not None:
                    found[0].append(i)
                    return found
    return None


def _suspect(data: Mapping[Any, Any]) -> bool:
    """Whether ``data`` (flat, in every contract) holds anything but plain scalars: a
    key that is not a string, bytes, a container, another type, or an int beyond 64 bits."""
    for k, v in data.items():
        if type(k) is not str:
            return True
        t = type(v)
        if t is str or t is float or t is bool or v is None:
            continue
        if t is not int or not _INT_MIN <= v <= _INT_MAX:
            return True
    return False


def _bad_text(text: str) -> tuple[list[str | int], str] | None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        cp = ord(text[exc.start])
        return [], (
            f"{text[:40]!r} is not valid Unicode: it holds the lone surrogate U+{cp:04X}, "
            "which UTF-8 (and so JSON) cannot encode"
        )
    return None


def _too_big() -> tuple[list[str | int], str]:
    return [], "the int is outside the 64-bit range events are stored in"


def _non_finite(value: float) -> tuple[list[str | int], str]:
    return [], f"{value} has no JSON form (it would be sent as null)"


def _path(steps: list[str | int]) -> str:
    """``$.data.user_id``, ``$.data.x[2]``; a key that is not a plain ASCII name is quoted
    and escaped (``$.data['k\\ud800']``), so that the message is always printable."""
    out = ["$"]
    for step in reversed(steps):
        if isinstance(step, int):
            out.append(f"[{step}]")
        elif step.isascii() and step.isidentifier():
            out.append(f".{step}")
        else:
            out.append(f"[{step!r}]")
    return "".join(out)


def _first_foreign(value: object, depth: int = 0) -> list[str | int] | None:
    """The path (innermost step first) of the first value that is not a JSON type."""
    if isinstance(value, str | bool | int | float) or value is None:
        return None
    if depth < MAX_DEPTH and isinstance(value, Mapping | list | tuple):
        items = value.items() if isinstance(value, Mapping) else enumerate(value)
        for k, v in items:
            found = _first_foreign(v, depth + 1)
            if found is not None:
                found.append(k if isinstance(k, str | int) else repr(k))
                return found
        return None
    return []
