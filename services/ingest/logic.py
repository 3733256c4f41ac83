"""Pure validation of a batch of events: no I/O.

A batch is a JSON array of envelopes (:class:`~myelin.contracts.IncomingEvent`). The
batch as a whole can be refused (malformed JSON, too large, too many events); otherwise
each event is accepted or rejected on its own, with a machine-readable reason.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass
from enum import StrEnum

import msgspec

from myelin.contracts import ContractRegistry, IncomingEvent, StreamEvent
from myelin.subjects import event_subject


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
    subject: str
    payload: bytes  # msgpack StreamEvent
    trace_id: str


@dataclass(frozen=True, slots=True)
class Rejected:
    index: int
    event_id: str
    reason: Reason
    message: str
    raw: bytes
    producer_id: str = ""


Outcome = Accepted | Rejected

_raw_list = msgspec.json.Decoder(list[msgspec.Raw])
_envelope = msgspec.json.Decoder(IncomingEvent)
_mp = msgspec.msgpack.Encoder()
_PATH = re.compile(r"at `\$(.*)`")
_EVENT_ID = re.compile(rb'"event_id"\s*:\s*"([^"\\]{1,128})"')


def partition_of(key: str, partitions: int) -> int:
    """Stable across processes and versions (crc32, not Python's salted hash)."""
    return zlib.crc32(key.encode()) % partitions


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
    if len(items) > limits.max_batch_events:
        raise BatchRefused(
            Reason.TOO_MANY_EVENTS,
            f"batch has {len(items)} events; the limit is {limits.max_batch_events}: split it",
            413,
        )
    return items


def _guess_id(raw: bytes) -> str:
    m = _EVENT_ID.search(raw[:4096])
    return m.group(1).decode(errors="replace") if m else ""


def _field_error(exc: msgspec.ValidationError, prefix: str) -> str:
    text = str(exc)
    return _PATH.sub(lambda m: f"at `$.{prefix}{m.group(1)}`".replace("$..", "$."), text)


def validate_event(
    index: int,
    raw: bytes,
    registry: ContractRegistry,
    limits: Limits,
    now_ms: int,
    default_trace_id: str,
) -> Outcome:
    if len(raw) > limits.max_event_bytes:
        return Rejected(
            index,
            _guess_id(raw),
            Reason.EVENT_TOO_LARGE,
            f"event is {len(raw)} bytes; the limit is {limits.max_event_bytes}",
            raw[:1024],
        )
    try:
        env = _envelope.decode(raw)
    except msgspec.ValidationError as exc:
        return Rejected(index, _guess_id(raw), Reason.INVALID_ENVELOPE, _field_error(exc, ""), raw)
    contract = registry.get(env.type, env.schema_version)
    if contract is None:
        known = registry.versions(env.type)
        if not known:
            return Rejected(
                index,
                env.event_id,
                Reason.UNKNOWN_TYPE,
                f"unknown event type {env.type!r}; known types: {', '.join(registry.types())}",
                raw,
                env.producer_id,
            )
        return Rejected(
            index,
            env.event_id,
            Reason.UNKNOWN_VERSION,
            f"{env.type} has no schema version {env.schema_version}; known: {known}",
            raw,
            env.producer_id,
        )
    if env.event_time > now_ms + limits.max_future_skew_ms:
        return Rejected(
            index,
            env.event_id,
            Reason.CLOCK_SKEW,
            f"event_time is {(env.event_time - now_ms) / 1000:.0f}s in the future; "
            f"at most {limits.max_future_skew_ms / 1000:.0f}s is accepted",
            raw,
            env.producer_id,
        )
    if env.event_time < now_ms - limits.max_age_ms:
        return Rejected(
            index,
            env.event_id,
            Reason.CLOCK_SKEW,
            f"event_time is {(now_ms - env.event_time) / 86_400_000:.1f} days old; "
            f"at most {limits.max_age_ms / 86_400_000:.0f} days is accepted",
            raw,
            env.producer_id,
        )
    try:
        payload = contract.json_decoder.decode(env.data)
    except msgspec.ValidationError as exc:
        return Rejected(
            index,
            env.event_id,
            Reason.INVALID_PAYLOAD,
            _field_error(exc, "data"),
            raw,
            env.producer_id,
        )
    except msgspec.DecodeError as exc:  # pragma: no cover - the outer decode already parsed it
        return Rejected(index, env.event_id, Reason.INVALID_PAYLOAD, str(exc), raw, env.producer_id)
    key = getattr(payload, contract.key_field)
    partition = partition_of(key, limits.partitions)
    trace_id = env.trace_id or default_trace_id
    stored = StreamEvent(
        event_id=env.event_id,
        type=env.type,
        schema_version=env.schema_version,
        event_time=env.event_time,
        ingest_time=now_ms,
        producer_id=env.producer_id,
        client_version=env.client_version,
        trace_id=trace_id,
        entity_id=key,
        partition=partition,
        data=msgspec.Raw(_mp.encode(payload)),
    )
    return Accepted(
        index, env.event_id, event_subject(env.type, partition), _mp.encode(stored), trace_id
    )


def validate_batch(
    items: list[msgspec.Raw],
    registry: ContractRegistry,
    limits: Limits,
    now_ms: int,
    default_trace_id: str = "",
) -> list[Outcome]:
    """Each event validated on its own; a repeated ``event_id`` within a batch is rejected."""
    out: list[Outcome] = []
    seen: set[str] = set()
    for i, raw in enumerate(items):
        outcome = validate_event(i, bytes(raw), registry, limits, now_ms, default_trace_id)
        if isinstance(outcome, Accepted):
            if outcome.event_id in seen:
                outcome = Rejected(
                    i,
                    outcome.event_id,
                    Reason.DUPLICATE_IN_BATCH,
                    f"event_id {outcome.event_id!r} appears more than once in this batch",
                    bytes(raw),
                )
            else:
                seen.add(outcome.event_id)
        out.append(outcome)
    return out
