from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from myelin.contracts import StreamEvent, default_registry
from myelin.contracts.events import PurchaseV1
from services.ingest.logic import (
    Accepted,
    BatchRefused,
    Limits,
    Reason,
    Rejected,
    parse_batch,
    partition_of,
    validate_batch,
)

NOW = 1_800_000_000_000
LIMITS = Limits(max_event_bytes=4096, max_batch_bytes=64 * 1024, max_batch_events=100, partitions=8)
REG = default_registry()


def ev(**over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "event_id": "e1",
        "type": "purchase",
        "schema_version": 1,
        "event_time": NOW - 1000,
        "producer_id": "shop",
        "data": {"user_id": "u1", "item_id": "i1", "amount": 9.5},
    }
    base.update(over)
    return base


def run(events: list[Any]) -> list[Accepted | Rejected]:
    return validate_batch(
        parse_batch(json.dumps(events).encode(), LIMITS), REG, LIMITS, NOW, "t" * 32
    )


def test_valid_event_is_stamped_and_partitioned_by_its_key() -> None:
    [out] = run([ev()])
    assert isinstance(out, Accepted)
    stored = msgspec.msgpack.decode(out.payload, type=StreamEvent)
    assert stored.entity_id == "u1"
    assert stored.partition == partition_of("u1", 8)
    assert out.subject == f"myelin.events.purchase.{stored.partition}"
    assert stored.ingest_time == NOW
    assert stored.trace_id == "t" * 32
    assert stored.producer_id == "shop"
    payload = msgspec.msgpack.decode(stored.data, type=PurchaseV1)
    assert payload.amount == 9.5 and payload.currency == "EUR"


def test_producer_trace_id_is_kept() -> None:
    [out] = run([ev(trace_id="abc")])
    assert isinstance(out, Accepted) and out.trace_id == "abc"


def test_partition_is_stable() -> None:
    assert partition_of("user-1", 16) == partition_of("user-1", 16)
    assert {partition_of(f"u{i}", 4) for i in range(100)} == {0, 1, 2, 3}


@pytest.mark.parametrize(
    ("event", "reason", "fragment"),
    [
        (
            ev(data={"user_id": 5, "item_id": "i", "amount": 1}),
            Reason.INVALID_PAYLOAD,
            "$.data.user_id",
        ),
        (ev(data={"item_id": "i", "amount": 1}), Reason.INVALID_PAYLOAD, "user_id"),
        (
            ev(data={"user_id": "u", "item_id": "i", "amount": -1}),
            Reason.INVALID_PAYLOAD,
            "$.data.amount",
        ),
        (
            ev(data={"user_id": "u", "item_id": "i", "amount": 1, "x": 1}),
            Reason.INVALID_PAYLOAD,
            "x",
        ),
        (ev(type="page_view"), Reason.UNKNOWN_TYPE, "known types"),
        (ev(schema_version=7), Reason.UNKNOWN_VERSION, "known: [1]"),
        (ev(event_time=NOW + 3_600_000), Reason.CLOCK_SKEW, "future"),
        (ev(event_time=NOW - 90 * 86_400_000), Reason.CLOCK_SKEW, "days old"),
        (ev(event_time="yesterday"), Reason.INVALID_ENVELOPE, "$.event_time"),
        ({"type": "click"}, Reason.INVALID_ENVELOPE, "event_id"),
        ("a string", Reason.INVALID_ENVELOPE, "object"),
        (
            ev(data={"user_id": "u" * 5000, "item_id": "i", "amount": 1}),
            Reason.EVENT_TOO_LARGE,
            "4096",
        ),
    ],
)
def test_each_defect_has_a_specific_reason(event: Any, reason: Reason, fragment: str) -> None:
    [out] = run([event])
    assert isinstance(out, Rejected)
    assert out.reason == reason
    assert fragment in out.message


def test_duplicate_ids_in_one_batch_are_rejected_after_the_first() -> None:
    a, b = run([ev(), ev()])
    assert isinstance(a, Accepted)
    assert isinstance(b, Rejected) and b.reason == Reason.DUPLICATE_IN_BATCH


@pytest.mark.parametrize(
    ("body", "reason", "status"),
    [
        (b"[{", Reason.MALFORMED_JSON, 400),
        (b'{"event_id": "x"}', Reason.NOT_A_BATCH, 400),
        (b"\xff\xfe[]", Reason.MALFORMED_JSON, 400),
        (
            json.dumps([ev(event_id=str(i)) for i in range(101)]).encode(),
            Reason.TOO_MANY_EVENTS,
            413,
        ),
        (b"[" + b" " * (64 * 1024) + b"]", Reason.BATCH_TOO_LARGE, 413),
    ],
)
def test_whole_batch_refusals(body: bytes, reason: Reason, status: int) -> None:
    with pytest.raises(BatchRefused) as info:
        parse_batch(body, LIMITS)
    assert info.value.reason == reason
    assert info.value.status == status


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_never_crash(body: bytes) -> None:
    try:
        items = parse_batch(body, LIMITS)
    except BatchRefused as refused:
        assert refused.status in (400, 413)  # noqa: PT017 - raising is optional here
        return
    outcomes = validate_batch(items, REG, LIMITS, NOW)
    assert len(outcomes) == len(items)


@settings(max_examples=300, deadline=None)
@given(st.lists(json_values, max_size=5))
def test_arbitrary_json_yields_one_outcome_per_item(items: list[Any]) -> None:
    outcomes = run(items)
    assert [o.index for o in outcomes] == list(range(len(items)))
    assert all(isinstance(o, Rejected) and o.message for o in outcomes)


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["user_id", "item_id", "amount", "currency", "extra"]), json_values
    )
)
def test_mutated_payloads_are_accepted_only_when_valid(data: dict[str, Any]) -> None:
    [out] = run([ev(data=data)])
    try:
        msgspec.convert(data, PurchaseV1)
        valid = True
    except msgspec.ValidationError:
        valid = False
    assert isinstance(out, Accepted) == valid
