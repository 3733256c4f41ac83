"""Pure ingest logic: validation, PII tokenization, partitioning and message planning.

A batch is a JSON array of envelopes (:class:`~myelin.contracts.IncomingEvent`). The batch
as a whole can be refused (malformed JSON, too large, too many events); otherwise each
event is accepted or rejected on its own, with a machine-readable reason. Accepted events
are grouped into JetStream messages by partition, in batch order; a rejected event's payload
is sanitized (PII tokenized, or redacted when its contract is unknown) before it goes
anywhere.
"""

from __future__ import annotations

import hashlib
import itertools
import re
import zlib
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import msgspec

from myelin.contracts import Contract, ContractRegistry, IncomingEvent, StreamEvent
from myelin.pii import Tokenizer
from myelin.subject_keys import is_token, seal
from myelin.subjects import event_subject, partition_of

MAX_EVENTS_PER_MESSAGE = 100


class Reason(StrEnum):
    MALFORMED_JSON = "malformed_json"
    NOT_A_BATCH = "not_a_batch"
    BATCH_TOO_LARGE = "batch_too_large"
    TOO_MANY_EVENTS = "too_many_events"
    EVENT_TOO_LARGE = "event_too_large"
    INVALID_ENVELOPE = "invalid_envelope"
    UNKNOWN_TYPE = "unknown_type"
    UNKNOWN_VERSION = "unknown_version"
    INVALID_PAYLOAD = "invalid_payload"
    DUPLICATE_IN_BATCH = "duplicate_in_batch"
    CLOCK_SKEW = "clock_skew"
    OVERLOADED = "overloaded"


@dataclass(frozen=True)
class Limits:
    max_event_bytes: int
    max_batch_bytes: int
    max_batch_events: int
    partitions: int
    max_future_skew_ms: int = 5 * 60 * 1000
    max_age_ms: int = 30 * 24 * 3600 * 1000
    hot_keys: frozenset[str] = field(default_factory=frozenset)
    salt_buckets: int = 4


class BatchRefused(Exception):
    """The whole batch is refused; nothing of it is applied."""

    def __init__(self, reason: Reason, message: str, status: int) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.status = status


@dataclass(frozen=True, slots=True)
class Accepted:
    index: int
    event_id: str
    event: StreamEvent


@dataclass(frozen=True, slots=True)
class Rejected:
    index: int
    event_id: str
    reason: Reason
    message: str
    raw: bytes  # already sanitized: no raw PII
    producer_id: str = ""


Outcome = Accepted | Rejected


@dataclass(frozen=True, slots=True)
class PlannedMessage:
    subject: str
    payload: bytes  # msgpack list[StreamEvent]
    msg_id: str
    indices: tuple[int, ...]  # positions in the batch
    event_ids: tuple[str, ...]


_raw_list = msgspec.json.Decoder(list[msgspec.Raw])
_envelopes = msgspec.json.Decoder(list[IncomingEvent])
_envelope = msgspec.json.Decoder(IncomingEvent)
_mp = msgspec.msgpack.Encoder()
_json = msgspec.json.Encoder()
_PATH = re.compile(r"at `\$(.*)`")
_EVENT_ID = re.compile(rb'"event_id"\s*:\s*"([^"\\]{1,128})"')


def partition_for(key: str, event_id: str, limits: Limits) -> int:
    """A hot key is spread over ``salt_buckets`` partitions by event id: its events lose
    their relative order across those partitions (each stays ordered within one)."""
    if key in limits.hot_keys:
        salt = zlib.crc32(event_id.encode()) % limits.salt_buckets
        return zlib.crc32(f"{key}#{salt}".encode()) % limits.partitions
    return zlib.crc32(key.encode()) % limits.partitions


def parse_batch(body: bytes, limits: Limits) -> list[msgspec.Raw]:
    if len(body) > limits.max_batch_bytes:
        raise BatchRefused(
            Reason.BATCH_TOO_LARGE,
            f"batch is {len(body)} bytes; the limit is {limits.max_batch_bytes}: split it",
            413,
        )
    try:
        items = _raw_list.decode(body)
    except msgspec.ValidationError:
        raise BatchRefused(
            Reason.NOT_A_BATCH, "the body must be a JSON array of events", 400
        ) from None
    except msgspec.DecodeError as exc:
        raise BatchRefused(Reason.MALFORMED_JSON, f"malformed JSON: {exc}", 400) from None
    except RecursionError:
        raise BatchRefused(
            Reason.MALFORMED_JSON, "malformed JSON: nested too deeply", 400
        ) from None
    except UnicodeDecodeError as exc:
        raise BatchRefused(Reason.MALFORMED_JSON, _utf8_error(exc), 400) from None
    if len(items) > limits.max_batch_events:
        raise BatchRefused(
            Reason.TOO_MANY_EVENTS,
            f"batch has {len(items)} events; the limit is {limits.max_batch_events}: split it",
            413,
        )
    return items


def env_raw(env: IncomingEvent) -> bytes:
    """An envelope as JSON again (what a rejected event is dead-lettered as, sanitized)."""
    return _json.encode(env)


def _utf8_error(exc: UnicodeDecodeError) -> str:
    """Where a JSON string holds bytes that are not UTF-8 (JSON text must be UTF-8)."""
    bad = exc.object[exc.start : exc.end][:8].hex(" ")
    return f"a string is not valid UTF-8 ({exc.reason}: bytes {bad}); send UTF-8 JSON"


def _guess_id(raw: bytes) -> str:
    m = _EVENT_ID.search(raw[:4096])
    return m.group(1).decode(errors="replace") if m else ""


def _field_error(exc: msgspec.ValidationError, prefix: str) -> str:
    text = str(exc)
    return _PATH.sub(lambda m: f"at `$.{prefix}{m.group(1)}`".replace("$..", "$."), text)


def _seal(key: bytes, subject: str, value: Any) -> Any:
    if not isinstance(value, str) or not value or is_token(value):
        return value  # empty stays empty; already a subject token: idempotent
    return seal(key, subject, value)


def _tokenize_leaves(value: Any, tok: Tokenizer) -> Any:
    if isinstance(value, str):
        return tok.token(value)
    if isinstance(value, dict):
        return {k: _tokenize_leaves(v, tok) for k, v in value.items()}
    if isinstance(value, list):
        return [_tokenize_leaves(v, tok) for v in value]
    return value


def _redacted(raw: bytes) -> bytes:
    return _json.encode(
        {"redacted": True, "bytes": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}
    )


def sanitize(raw: bytes, registry: ContractRegistry, tok: Tokenizer) -> bytes:
    """A rejected event as it may be stored: PII fields tokenized when the contract is
    known; every string in ``data`` tokenized when it is not; unparseable input, or input
    nested too deeply to walk, redacted (size and hash)."""
    try:
        return _sanitize(raw, registry, tok)
    except RecursionError:
        return _redacted(raw)


def _sanitize(raw: bytes, registry: ContractRegistry, tok: Tokenizer) -> bytes:
    try:
        doc = msgspec.json.decode(raw)
    except (msgspec.DecodeError, RecursionError, UnicodeDecodeError):
        return _redacted(raw)
    if not isinstance(doc, dict):
        return _json.encode(_tokenize_leaves(doc, tok))
    data = doc.get("data")
    contract = None
    if isinstance(doc.get("type"), str) and isinstance(doc.get("schema_version"), int):
        contract = registry.get(doc["type"], doc["schema_version"])
    if contract is not None and isinstance(data, dict):
        for f in contract.pii_fields:
            if f in data:
                v = data[f]
                data[f] = tok.token(v) if isinstance(v, str) else "[redacted]"
    else:
        doc["data"] = _tokenize_leaves(data, tok)
    for k in list(doc):  # unknown envelope fields may hold anything
        if k not in IncomingEvent.__struct_fields__:
            doc[k] = _tokenize_leaves(doc[k], tok)
    return _json.encode(doc)


class Validator:
    """Validates events against a registry; tokenizes PII; stamps metadata."""

    def __init__(self, registry: ContractRegistry, limits: Limits, tokenizer: Tokenizer) -> None:
        self.registry = registry
        self.limits = limits
        self.tok = tokenizer

    def reject(
        self,
        index: int,
        raw: bytes | msgspec.Raw,
        reason: Reason,
        message: str,
        event_id: str = "",
        producer: str = "",
    ) -> Rejected:
        data = bytes(raw)
        return Rejected(
            index,
            event_id or _guess_id(data),
            reason,
            message,
            sanitize(data[: self.limits.max_event_bytes], self.registry, self.tok),
            producer,
        )

    def event(
        self,
        index: int,
        raw: bytes | msgspec.Raw,
        env: IncomingEvent | None,
        now_ms: int,
        trace_id: str,
        producer: str = "",
        subject_keys: Mapping[str, bytes] | None = None,
    ) -> Outcome:
        """``producer``: the authenticated producer, which wins over the envelope's;
        ``subject_keys``: see :meth:`accept`."""
        limits = self.limits
        if len(raw) > limits.max_event_bytes:
            return self.reject(
                index,
                raw,
                Reason.EVENT_TOO_LARGE,
                f"event is {len(raw)} bytes; the limit is {limits.max_event_bytes}",
            )
        if env is None:
            try:
                env = _envelope.decode(raw)
            except msgspec.ValidationError as exc:
                return self.reject(index, raw, Reason.INVALID_ENVELOPE, _field_error(exc, ""))
            except RecursionError:
                return self.reject(index, raw, Reason.INVALID_ENVELOPE, "JSON nested too deeply")
            except UnicodeDecodeError as exc:
                return self.reject(index, raw, Reason.INVALID_ENVELOPE, _utf8_error(exc))
        contract = self.registry.get(env.type, env.schema_version)
        if contract is None:
            known = self.registry.versions(env.type)
            if not known:
                return self.reject(
                    index,
                    raw,
                    Reason.UNKNOWN_TYPE,
                    f"unknown event type {env.type!r}; known types: "
                    f"{', '.join(self.registry.types())}",
                    env.event_id,
                    producer or env.producer_id,
                )
            return self.reject(
                index,
                raw,
                Reason.UNKNOWN_VERSION,
                f"{env.type} has no schema version {env.schema_version}; known: {known}",
                env.event_id,
                producer or env.producer_id,
            )
        if env.event_time > now_ms + limits.max_future_skew_ms:
            return self.reject(
                index,
                raw,
                Reason.CLOCK_SKEW,
                f"event_time is {(env.event_time - now_ms) / 1000:.0f}s in the future; "
                f"at most {limits.max_future_skew_ms / 1000:.0f}s is accepted",
                env.event_id,
                producer or env.producer_id,
            )
        if env.event_time < now_ms - limits.max_age_ms:
            return self.reject(
                index,
                raw,
                Reason.CLOCK_SKEW,
                f"event_time is {(now_ms - env.event_time) / 86_400_000:.1f} days old; "
                f"at most {limits.max_age_ms / 86_400_000:.0f} days is accepted",
                env.event_id,
                producer or env.producer_id,
            )
        try:
            payload = contract.json_decoder.decode(env.data)
        except msgspec.ValidationError as exc:
            return self.reject(
                index,
                raw,
                Reason.INVALID_PAYLOAD,
                _field_error(exc, "data"),
                env.event_id,
                producer or env.producer_id,
            )
        except RecursionError:
            return self.reject(
                index,
                raw,
                Reason.INVALID_PAYLOAD,
                "data nested too deeply",
                env.event_id,
                producer or env.producer_id,
            )
        except UnicodeDecodeError as exc:
            return self.reject(
                index,
                raw,
                Reason.INVALID_PAYLOAD,
                f"data: {_utf8_error(exc)}",
                env.event_id,
                producer or env.producer_id,
            )
        return self.accept(index, env, contract, payload, now_ms, trace_id, producer, subject_keys)

    def accept(
        self,
        index: int,
        env: IncomingEvent,
        contract: Contract,
        payload: Any,
        now_ms: int,
        trace_id: str,
        producer: str = "",
        subject_keys: Mapping[str, bytes] | None = None,
    ) -> Outcome:
        """Tokenize PII, pick the partition and stamp the stored form of a valid event
        (``producer``: the authenticated producer, which wins over the envelope's).

        With ``subject_keys`` (the subject keys of the batch, :func:`pii_subjects`) each
        PII field is sealed with its subject's key (:mod:`myelin.subject_keys`, erasable);
        without, it gets the deployment-wide HMAC token."""
        key = getattr(payload, contract.key_field)
        if contract.pii_fields:
            if subject_keys is None:
                token = self.tok.token
                payload = msgspec.structs.replace(
                    payload, **{f: token(getattr(payload, f)) for f in contract.pii_fields}
                )
            else:
                skey = subject_keys[key]  # fetched for every subject of the batch
                payload = msgspec.structs.replace(
                    payload,
                    **{f: _seal(skey, key, getattr(payload, f)) for f in contract.pii_fields},
                )
        lim = self.limits
        part = (
            partition_of(key, lim.partitions)
            if key not in lim.hot_keys
            else partition_for(key, env.event_id, lim)
        )
        try:
            data = _mp.encode(payload)
        except OverflowError:  # an int field without bounds took a number past 64 bits
            return self.reject(
                index,
                env_raw(env),
                Reason.INVALID_PAYLOAD,
                "data: a number is outside the 64-bit range (-2**63 .. 2**64-1)",
                env.event_id,
                producer or env.producer_id,
            )
        stored = StreamEvent(
            event_id=env.event_id,
            type=env.type,
            schema_version=env.schema_version,
            event_time=env.event_time,
            ingest_time=now_ms,
            producer_id=producer or env.producer_id,
            client_version=env.client_version,
            trace_id=env.trace_id or trace_id,
            entity_id=key,
            partition=part,
            data=msgspec.Raw(data),
        )
        return Accepted(index, env.event_id, stored)

    def envelopes(self, items: list[msgspec.Raw], body: bytes | None) -> list[IncomingEvent | None]:
        """The batch's envelopes decoded in one call when the whole body is valid (else
        ``None`` each: every event then takes the full path, with its own verdict)."""
        if body is not None and all(len(r) <= self.limits.max_event_bytes for r in items):
            try:
                return list(_envelopes.decode(body))
            except (msgspec.ValidationError, RecursionError, UnicodeDecodeError):
                pass
        return [None] * len(items)

    def pii_subjects(self, items: list[msgspec.Raw], envs: list[IncomingEvent | None]) -> set[str]:
        """The subjects (key field values) of the events whose contract has PII fields:
        whose keys :meth:`batch` needs. An event that will be rejected may be counted;
        that costs a key, never a wrong token."""
        if not self.registry.has_pii:
            return set()
        out: set[str] = set()
        lookup = self.registry.lookup
        for i, raw in enumerate(items):
            env = envs[i]
            if env is None:
                try:
                    env = _envelope.decode(raw)
                except (msgspec.ValidationError, RecursionError, UnicodeDecodeError):
                    continue
            contract = lookup.get((env.type, env.schema_version))
            if contract is None or not contract.pii_fields:
                continue
            try:
                payload = contract.json_decoder.decode(env.data)
            except (msgspec.ValidationError, RecursionError, UnicodeDecodeError):
                continue
            key = getattr(payload, contract.key_field, None)
            if isinstance(key, str):
                out.add(key)
        return out

    def batch(
        self,
        items: list[msgspec.Raw],
        now_ms: int,
        trace_id: str = "",
        body: bytes | None = None,
        producer: str = "",
        subject_keys: Mapping[str, bytes] | None = None,
        envs: list[IncomingEvent | None] | None = None,
    ) -> list[Outcome]:
        """Each event validated on its own; a repeated ``event_id`` in a batch is rejected.
        ``producer``: who sent the batch, as authenticated (its credential, not the body,
        names the producer); '' keeps each envelope's ``producer_id``. ``subject_keys``:
        see :meth:`accept`; ``envs``: :meth:`envelopes` of the batch, if already decoded.

        Fast path: when the whole body decodes as envelopes in one call, per-event envelope
        decoding is skipped."""
        if envs is None:
            envs = self.envelopes(items, body)
        out: list[Outcome] = []
        seen: set[str] = set()
        # The common case (valid event, known contract, plausible time) runs inline with
        # local names; anything unusual takes the full path in ``event`` for its verdict.
        lim = self.limits
        max_bytes = lim.max_event_bytes
        newest, oldest = now_ms + lim.max_future_skew_ms, now_ms - lim.max_age_ms
        contracts = self.registry.lookup
        for i, raw in enumerate(items):
            env = envs[i]
            outcome: Outcome | None = None
            if env is not None and len(raw) <= max_bytes and oldest <= env.event_time <= newest:
                contract = contracts.get((env.type, env.schema_version))
                if contract is not None:
                    try:
                        payload = contract.json_decoder.decode(env.data)
                    except (msgspec.ValidationError, RecursionError, UnicodeDecodeError):
                        payload = None
                    if payload is not None:
                        outcome = self.accept(
                            i, env, contract, payload, now_ms, trace_id, producer, subject_keys
                        )
            if outcome is None:
                outcome = self.event(i, raw, env, now_ms, trace_id, producer, subject_keys)
            if isinstance(outcome, Accepted):
                if outcome.event_id in seen:
                    outcome = self.reject(
                        i,
                        raw,
                        Reason.DUPLICATE_IN_BATCH,
                        f"event_id {outcome.event_id!r} appears more than once in this batch",
                        outcome.event_id,
                        outcome.event.producer_id,
                    )
                else:
                    seen.add(outcome.event_id)
            out.append(outcome)
        return out


_HEADER_SAFE = re.compile(r"[!-~](?:[ -~]*[!-~])?")


def event_msg_id(event_id: str) -> str:
    """The ``Nats-Msg-Id`` of a one-event message: the id itself when a header carries it
    unchanged (printable ASCII, no surrounding spaces), else a hash of it. nats-py strips a
    header value and turns CR/LF into spaces, so ``" a"`` and ``"a"`` would share one id and
    the second event would be dropped as a duplicate."""
    if _HEADER_SAFE.fullmatch(event_id):
        return event_id
    return "id-sha256:" + hashlib.sha256(event_id.encode()).hexdigest()


def plan_messages(
    accepted: list[Accepted], per_event: bool, max_per_message: int = MAX_EVENTS_PER_MESSAGE
) -> list[PlannedMessage]:
    """Group events into JetStream messages by partition, keeping batch order (so each
    entity's events keep their relative order).

    Per-event mode: one message per event, ``Nats-Msg-Id`` = event id. Batched mode: up to
    ``max_per_message`` events per message, id = hash of their ids, so a retried batch
    produces the same messages and the stream drops them as duplicates."""
    if per_event:
        return [
            PlannedMessage(
                event_subject(a.event.partition),
                _mp.encode([a.event]),
                event_msg_id(a.event_id),
                (a.index,),
                (a.event_id,),
            )
            for a in accepted
        ]
    groups: OrderedDict[int, list[Accepted]] = OrderedDict()
    for a in accepted:
        groups.setdefault(a.event.partition, []).append(a)
    out = []
    for part, evs in groups.items():
        for i in range(0, len(evs), max_per_message):
            chunk = evs[i : i + max_per_message]
            ids = tuple(a.event_id for a in chunk)
            digest = hashlib.sha256("\0".join(ids).encode()).hexdigest()[:40]
            out.append(
                PlannedMessage(
                    event_subject(part),
                    _mp.encode([a.event for a in chunk]),
                    f"b:{digest}",
                    tuple(a.index for a in chunk),
                    ids,
                )
            )
    return out


class RecentIds:
    """Event ids stored recently (bounded, with expiry): a batch that repeats events from an
    earlier, different batch is answered ``duplicate`` without storing them again.

    A plain dict in insertion order: lookups and bulk inserts run at C speed; the oldest
    entries are evicted first when the bound is reached."""

    def __init__(self, max_items: int, ttl_ms: int) -> None:
        self.max_items = max_items
        self.ttl_ms = ttl_ms
        self._items: dict[str, int] = {}

    def seen(self, event_id: str, now_ms: int) -> bool:
        t = self._items.get(event_id)
        return t is not None and now_ms - t <= self.ttl_ms

    def add(self, ids: tuple[str, ...], now_ms: int) -> None:
        items = self._items
        items.update(dict.fromkeys(ids, now_ms))
        excess = len(items) - self.max_items
        if excess > 0:
            for k in list(itertools.islice(items, excess)):
                del items[k]

    def __len__(self) -> int:
        return len(self._items)
