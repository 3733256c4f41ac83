"""The versioned envelope every event travels in.

``IncomingEvent`` is what producers send (JSON over HTTP, or JSON/msgpack over NATS);
``StreamEvent`` is what ingest publishes on the EVENTS stream (msgpack), stamped with
producer metadata and the partition key. ``data`` stays raw in the envelope and is
decoded with the decoder of its ``(type, schema_version)`` contract.
"""

from __future__ import annotations

from typing import Annotated

import msgspec

Id = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
TypeName = Annotated[str, msgspec.Meta(pattern=r"^[a-z][a-z0-9_]{0,63}$")]
EpochMillis = Annotated[int, msgspec.Meta(ge=0, le=32503680000000)]


class IncomingEvent(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One event as a producer sends it.

    ``event_time`` is epoch milliseconds (UTC). ``event_id`` is the producer's idempotency
    key: sending the same id twice inside the duplicate window stores the event once.
    """

    event_id: Id
    type: TypeName
    schema_version: Annotated[int, msgspec.Meta(ge=1, le=1000)]
    event_time: EpochMillis
    producer_id: Id = "anonymous"
    client_version: Annotated[str, msgspec.Meta(max_length=64)] = ""
    trace_id: Annotated[str, msgspec.Meta(max_length=64)] = ""
    data: msgspec.Raw


class StreamEvent(msgspec.Struct, frozen=True, kw_only=True, array_like=True):
    """One event as stored on the EVENTS stream (msgpack, positional for compactness).

    New fields may only be appended, with defaults.
    """

    event_id: str
    type: str
    schema_version: int
    event_time: int
    ingest_time: int
    producer_id: str
    client_version: str
    trace_id: str
    entity_id: str
    partition: int
    data: msgspec.Raw
