from __future__ import annotations

import msgspec
import pytest

from myelin.contracts.compat import check
from myelin.contracts.events import PurchaseV2
from myelin.contracts.schema import (
    ContractSpec,
    FieldSpec,
    Mode,
    SpecError,
    spec_from_struct,
    struct_from_spec,
)

KEY = FieldSpec("user_id", "string")


def spec(
    version: int, *fields: FieldSpec, mode: Mode = "BACKWARD", key: str = "user_id"
) -> ContractSpec:
    return ContractSpec(
        type="order", version=version, key_field=key, fields=[KEY, *fields], compatibility=mode
    )


def changes(new: ContractSpec, *history: ContractSpec) -> list[tuple[str, str, int]]:
    return [(p.field, p.change, p.against_version) for p in check(new, list(history))]


def test_adding_a_field_needs_a_default_for_backward() -> None:
    v1 = spec(1)
    assert changes(spec(2, FieldSpec("note", "string")), v1) == [
        ("note", "field_added_without_default", 1)
    ]
    assert changes(spec(2, FieldSpec("note", "string", required=False, default="")), v1) == []


def test_removing_a_required_field_breaks_forward_not_backward() -> None:
    v1 = spec(1, FieldSpec("qty", "int"))
    assert changes(spec(2, mode="BACKWARD"), v1) == []
    assert changes(spec(2, mode="FORWARD"), v1) == [("qty", "field_removed", 1)]
    assert changes(spec(2, mode="FULL"), v1) == [("qty", "field_removed", 1)]
    v1d = spec(1, FieldSpec("qty", "int", required=False, default=1))
    assert changes(spec(2, mode="FULL"), v1d) == []


def test_type_changes_and_widening() -> None:
    v1 = spec(1, FieldSpec("qty", "int"))
    [p] = check(spec(2, FieldSpec("qty", "string")), [v1])
    assert (p.change, p.detail) == ("type_changed", "type int cannot be read as string")
    assert changes(spec(2, FieldSpec("qty", "float"), mode="BACKWARD"), v1) == []
    assert changes(spec(2, FieldSpec("qty", "float"), mode="FORWARD"), v1) == [
        ("qty", "type_changed", 1)
    ]
    [p] = check(spec(2, FieldSpec("qty", "int", le=10)), [spec(1, FieldSpec("qty", "int", le=100))])
    assert p.detail == "le tightened from 100 to 10"


def test_transitive_catches_a_reused_name_that_pairwise_checks_miss() -> None:
    v1 = spec(1, FieldSpec("ref", "int", required=False, default=0), mode="FULL")
    v2 = spec(2, mode="FULL")
    v3_plain = spec(3, FieldSpec("ref", "string", required=False, default=""), mode="FULL")
    v3_trans = spec(
        3, FieldSpec("ref", "string", required=False, default=""), mode="FULL_TRANSITIVE"
    )
    assert changes(v2, v1) == []
    assert changes(v3_plain, v1, v2) == []
    assert ("ref", "type_changed", 1) in changes(v3_trans, v1, v2)


def test_rules_that_hold_in_every_mode() -> None:
    v1 = ContractSpec(
        type="order",
        version=1,
        key_field="user_id",
        fields=[KEY, FieldSpec("shop", "string"), FieldSpec("email", "string", pii=True)],
    )
    v2 = ContractSpec(
        type="order",
        version=2,
        key_field="shop",
        compatibility="NONE",
        fields=[KEY, FieldSpec("shop", "string"), FieldSpec("email", "string")],
    )
    assert changes(v2, v1) == [("shop", "key_field_changed", 1), ("email", "pii_flag_removed", 1)]
    assert changes(spec(1), spec(1)) == [("version", "version_not_increasing", 1)]


def test_struct_from_spec_validates_like_the_code_struct() -> None:
    s = spec_from_struct("purchase", 2, PurchaseV2, "user_id", ("email",))
    assert s.pii_fields == ("email",)
    dyn = struct_from_spec(s)
    for doc in [
        b'{"user_id":"u","item_id":"i","amount":2.5}',
        b'{"user_id":"u","item_id":"i","amount":-1}',
        b'{"user_id":"u","item_id":"i","amount":1,"currency":"eur"}',
        b'{"user_id":"u","amount":1}',
        b'{"user_id":"u","item_id":"i","amount":1,"zip":1}',
    ]:
        ok_code = _ok(PurchaseV2, doc)
        assert ok_code == _ok(dyn, doc), doc
    decoded = msgspec.json.decode(b'{"user_id":"u","item_id":"i","amount":1}', type=dyn)
    assert msgspec.structs.asdict(decoded)["currency"] == "EUR"


def _ok(t: type, doc: bytes) -> bool:
    try:
        msgspec.json.decode(doc, type=t)
        return True
    except msgspec.ValidationError:
        return False


@pytest.mark.parametrize(
    ("fields", "key", "msg"),
    [
        ([FieldSpec("x", "int")], "x", "non-null string"),
        ([FieldSpec("n", "int", pii=True)], "user_id", "only string fields can be PII"),
        ([FieldSpec("user_id", "string")], "user_id", "duplicate"),
    ],
)
def test_bad_specs_are_refused(fields: list[FieldSpec], key: str, msg: str) -> None:
    from myelin.contracts.schema import validate_spec

    with pytest.raises(SpecError, match=msg):
        validate_spec(ContractSpec(type="t", version=1, key_field=key, fields=[KEY, *fields]))
