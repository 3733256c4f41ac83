from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from myelin.contracts import StreamEvent, default_registry
from myelin.contracts.events import PurchaseV1, PurchaseV2
from myelin.pii import Tokenizer
from myelin.subjects import partition_of
from services.ingest.logic import (
    Accepted,
    BatchRefused,
    Limits,
    Reason,
    Rejected,
    Validator,
    parse_batch,
    partition_for,
    plan_messages,
    sanitize,
)

NOW = 1_800_000_000_000
LIMITS = Limits(max_event_bytes=4096, max_batch_bytes=64 * 1024, max_batch_events=100, partitions=8)
REG = default_registry()
TOK = Tokenizer({"k1": b"0123456789abcdef0123"}, "k1")
VALIDATOR = Validator(REG, LIMITS, TOK)


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
    body = json.dumps(events).encode()
    return VALIDATOR.batch(parse_batch(body, LIMITS), NOW, "t" * 32, body)


def test_valid_event_is_stamped_and_partitioned_by_its_key() -> None:
    [out] = run([ev()])
    assert isinstance(out, Accepted)
    [msg] = plan_messages([out], per_event=True)
    [stored] = msgspec.msgpack.decode(msg.payload, type=list[StreamEvent])
    assert stored == out.event and msg.msg_id == "e1"
    assert stored.entity_id == "u1"
    assert stored.partition == partition_of("u1", 8)
    assert msg.subject == f"myelin.events.{stored.partition}"
    assert stored.ingest_time == NOW
    assert stored.trace_id == "t" * 32
    assert stored.producer_id == "shop"
    payload = msgspec.msgpack.decode(stored.data, type=PurchaseV1)
    assert payload.amount == 9.5 and payload.currency == "EUR"


def test_producer_trace_id_is_kept() -> None:
    [out] = run([ev(trace_id="abc")])
    assert isinstance(out, Accepted) and out.event.trace_id == "abc"


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
        (ev(schema_version=7), Reason.UNKNOWN_VERSION, "known: [1, 2]"),
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
    outcomes = VALIDATOR.batch(items, NOW, "", body)
    assert len(outcomes) == len(items)
    assert all(b"\xff" not in o.raw for o in outcomes if isinstance(o, Rejected))


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


def test_pii_fields_are_tokenized_before_anything_is_stored() -> None:
    email = "ada@example.com"
    [out] = run(
        [ev(schema_version=2, data={"user_id": "u1", "item_id": "i", "amount": 3, "email": email})]
    )
    assert isinstance(out, Accepted)
    payload = msgspec.msgpack.decode(out.event.data, type=PurchaseV2)
    assert payload.email == TOK.token(email) and payload.email.startswith("pii:k1:")
    [again] = run(
        [ev(schema_version=2, data={"user_id": "u2", "item_id": "j", "amount": 1, "email": email})]
    )
    assert isinstance(again, Accepted)
    assert (
        msgspec.msgpack.decode(again.event.data, type=PurchaseV2).email == payload.email
    )  # stable: joins work
    rotated = Tokenizer({"k1": b"0123456789abcdef0123", "k2": b"another-key-of-20-bytes"}, "k2")
    assert rotated.token(email).startswith("pii:k2:") and rotated.token(email) != payload.email


@pytest.mark.parametrize(
    "event",
    [
        ev(
            schema_version=2,
            data={"user_id": "u", "item_id": "i", "amount": -1, "email": "ada@example.com"},
        ),
        ev(
            schema_version=2,
            data={"user_id": "u", "item_id": "i", "amount": 1, "email": ["ada@example.com"]},
        ),
        ev(type="signup", data={"contact": {"email": "ada@example.com"}}),
        ev(
            schema_version=2,
            data={"user_id": "u", "item_id": "i", "amount": 1, "email": "ada@example.com"},
            extra="ada@example.com",
        ),
    ],
)
def test_rejected_events_never_carry_raw_pii(event: dict[str, Any]) -> None:
    [out] = run([event])
    assert isinstance(out, Rejected)
    assert b"ada@example.com" not in out.raw
    assert b"ada" not in sanitize(b'{"broken": "ada@example.com"', REG, TOK)


def test_hot_keys_are_spread_over_salt_buckets() -> None:
    hot = Limits(4096, 65536, 100, partitions=64, hot_keys=frozenset({"whale"}), salt_buckets=4)
    parts = {partition_for("whale", f"e{i}", hot) for i in range(200)}
    assert 1 < len(parts) <= 4
    assert {partition_for("minnow", f"e{i}", hot) for i in range(50)} == {
        partition_of("minnow", 64)
    }


def test_batched_messages_group_by_type_and_partition_deterministically() -> None:
    events = [
        ev(event_id=f"e{i}", type="click", data={"user_id": f"u{i % 3}", "item_id": "i"})
        for i in range(90)
    ]
    outs = [o for o in run(events) if isinstance(o, Accepted)]
    msgs = plan_messages(outs, per_event=False, max_per_message=40)
    assert sum(len(m.indices) for m in msgs) == 90
    assert all(len(m.indices) <= 40 for m in msgs)
    assert [m.msg_id for m in msgs] == [
        m.msg_id for m in plan_messages(outs, per_event=False, max_per_message=40)
    ]
    for m in msgs:
        stored = msgspec.msgpack.decode(m.payload, type=list[StreamEvent])
        assert {f"myelin.events.{e.partition}" for e in stored} == {m.subject}
        assert [e.event_id for e in stored] == list(m.event_ids)


@pytest.mark.parametrize("depth", [100, 10_000])
def test_deeply_nested_payloads_are_refused_cleanly(depth: int) -> None:
    nested = "[" * depth + "]" * depth
    body = f'[{{"event_id": "n", "type": "click", "schema_version": 1, "event_time": {NOW}, "data": {nested}}}]'
    try:
        outcomes = run_body(body.encode())
    except BatchRefused as refused:
        assert refused.reason == Reason.MALFORMED_JSON  # noqa: PT017 - either outcome is fine
        assert "nested" in refused.message  # noqa: PT017
        return
    [out] = outcomes
    assert isinstance(out, Rejected) and out.reason == Reason.INVALID_PAYLOAD


def run_body(body: bytes) -> list[Accepted | Rejected]:
    return VALIDATOR.batch(parse_batch(body, LIMITS), NOW, "", body)
