"""Feature views that could not run are refused at registration with the exact problem;
what can run, runs: ratios in any order, nulls skipped, one effect per event id."""

from __future__ import annotations

import linecache
import traceback
from typing import Any

import msgspec
import pytest

from myelin.contracts.events import ClickV1, PurchaseV1
from myelin.contracts.registry import default_registry
from services.features.logic import (
    STATE_FORMAT,
    EntityState,
    Outcome,
    WindowEngine,
    id_hash,
    seen,
)
from services.features.vector_code import generated_filename
from services.features.views import (
    USER_ACTIVITY,
    Feature,
    FeatureView,
    InvalidView,
    contract_problems,
    view_doc,
    view_from_doc,
)

MIN = 60_000
T0 = 1_800_000_000_000 - (1_800_000_000_000 % MIN)
CLK = ClickV1(user_id="u", item_id="i")


class NullableBuy(msgspec.Struct, frozen=True):
    """A purchase whose amount may be null (or a schema version without the field)."""

    user_id: str
    amount: float | None = None


def doc(**changes: Any) -> dict[str, Any]:
    d = view_doc(USER_ACTIVITY)
    d["features"] = list(d["features"])
    d.update(changes)
    return d


def refusal(d: dict[str, Any]) -> str:
    with pytest.raises(InvalidView) as err:
        view_from_doc(d)
    return err.value.message


def test_definitions_that_cannot_run_are_refused_with_the_problem() -> None:
    assert "bucket_s" in refusal(doc(bucket_s=0))  # divided by it at run time on main
    features = doc()["features"]
    features[2] = {**features[2], "numerator": "clicks_10min"}
    assert "ratio of 'clicks_10min', which is not a feature" in refusal(doc(features=features))
    features = doc()["features"]
    features[2] = {**features[2], "numerator": "ctr_1h"}
    features[5] = {**features[5], "numerator": "ctr_10m"}
    assert "cycle: ctr_10m -> ctr_1h -> ctr_10m" in refusal(doc(features=features))
    features = doc()["features"]
    features[12] = {**features[12], "gap_s": 7200}
    assert "no longer than window_s" in refusal(doc(features=features))


def test_contract_problems_name_every_misread_field() -> None:
    d = doc(sources=["impression", "click", "purchase", "refund"])
    d["features"][7] = {**d["features"][7], "field": "amout"}
    d["features"][9] = {**d["features"][9], "field": "currency"}
    problems = contract_problems(view_from_doc(d), default_registry())
    assert problems == [
        "source 'refund' is not a registered event type (registered: click, impression, purchase)",
        "spend_1h: no version of 'purchase' has a field 'amout' "
        "(its fields: amount, currency, email, item_id, user_id)",
        "max_spend_1h: a max needs a numeric field; purchase.currency is string",
    ]
    assert contract_problems(USER_ACTIVITY, default_registry()) == []


def test_a_ratio_may_divide_a_ratio_declared_after_it() -> None:
    """On main the generated code read the later ratio before computing it (NameError)."""
    view = FeatureView(
        name="r",
        entity="user_id",
        sources=("click",),
        features=(
            Feature("ratio_of_ratios", "ratio", numerator="per_click", denominator="clicks"),
            Feature("clicks", "count", 600, "click"),
            Feature("per_click", "ratio", numerator="clicks", denominator="clicks"),
        ),
    )
    eng = WindowEngine(view)
    eng.smoke_test()
    st = EntityState()
    for seq in (1, 2):
        eng.apply(st, seq, "click", T0 + seq, CLK, f"e{seq}")
    assert eng.vector(st) == {"ratio_of_ratios": 0.5, "clicks": 2.0, "per_click": 1.0}


def test_aggregations_skip_nulls_like_sql() -> None:
    """On main a mean over a null raised TypeError (float(None)) and stopped the view."""
    view = FeatureView(
        name="spend",
        entity="user_id",
        sources=("purchase",),
        features=(
            Feature("n", "count", 600, "purchase"),
            Feature("avg", "mean", 600, "purchase", field="amount"),
            Feature("top", "max", 600, "purchase", field="amount"),
            Feature("kinds", "distinct", 600, "purchase", field="amount"),
        ),
    )
    eng = WindowEngine(view)
    st = EntityState()
    for seq, amount in enumerate([2.0, None, 4.0], start=1):
        assert eng.apply(st, seq, "purchase", T0, NullableBuy("u", amount), f"e{seq}") == 0
    assert eng.vector(st) == {"n": 3.0, "avg": 3.0, "top": 4.0, "kinds": 2.0}


def test_the_same_event_id_has_one_effect_whatever_its_sequence() -> None:
    eng = WindowEngine(USER_ACTIVITY)
    st = EntityState()
    assert (
        eng.apply(
            st, 1000, "purchase", T0 + 5, PurchaseV1(user_id="u", item_id="i", amount=3.0), "b1"
        )
        == Outcome.APPLIED
    )
    # the same event resent: another message, another batch, a restart (state reloaded)
    st = EntityState.decode(st.encode())
    assert (
        eng.apply(
            st, 7000, "purchase", T0 + 5, PurchaseV1(user_id="u", item_id="i", amount=3.0), "b1"
        )
        == Outcome.DUPLICATE
    )
    assert eng.apply(st, 8000, "click", T0 + 6, CLK, "c1") == Outcome.APPLIED
    v = eng.vector(st)
    assert v["purchases_1h"] == 1 and v["spend_1h"] == 3.0 and v["clicks_1h"] == 1
    # the control: with the guard off the resent copy counts twice
    off = WindowEngine(USER_ACTIVITY, dedupe=False)
    st = EntityState()
    for seq in (1000, 7000):
        off.apply(
            st, seq, "purchase", T0 + 5, PurchaseV1(user_id="u", item_id="i", amount=3.0), "b1"
        )
    assert off.vector(st)["purchases_1h"] == 2


def test_states_of_earlier_formats_read_and_keep_their_ids() -> None:
    """Format 2 had no id slot (read as empty); format 3 kept ids as strings (hashed when
    read, so a copy of an event applied before the upgrade is still a duplicate)."""
    eng = WindowEngine(USER_ACTIVITY)
    st = EntityState()
    eng.apply(st, 1, "click", T0, CLK, "c1")
    fmt, seq, wm, late, rows = msgspec.msgpack.decode(st.encode())
    assert fmt == STATE_FORMAT == 4
    assert rows[0][1][-1] == id_hash("c1")  # 8 bytes per id
    v2 = EntityState.decode(
        msgspec.msgpack.encode([2, seq, wm, late, [[b, row[:-1]] for b, row in rows]])
    )
    assert eng.vector(v2) == eng.vector(st)
    assert eng.apply(v2, 2, "click", T0, CLK, "c2") == Outcome.APPLIED
    v3 = EntityState.decode(
        msgspec.msgpack.encode([3, seq, wm, late, [[b, [*row[:-1], ["c1"]]] for b, row in rows]])
    )
    assert eng.vector(v3) == eng.vector(st)
    assert eng.apply(v3, 2, "click", T0, CLK, "c1") == Outcome.DUPLICATE
    assert eng.apply(v3, 3, "click", T0, CLK, "c3") == Outcome.APPLIED


def test_the_guard_only_matches_whole_entries() -> None:
    """A hash found across two stored entries (bytes 4..11 of two hashes) is no match."""
    a, b = bytes(range(8)), bytes(range(8, 16))
    assert seen(bytearray(a + b), b) and seen(a + b, a)
    assert not seen(bytearray(a + b), bytes(range(4, 12)))
    assert not seen(bytearray(), a)


def test_generated_code_shows_in_tracebacks() -> None:
    eng = WindowEngine(USER_ACTIVITY)
    name = generated_filename(USER_ACTIVITY)
    assert linecache.getline(name, 1).startswith("def roll(st, rest):")
    st = EntityState(buckets={0: [None]}, watermark=0)  # a broken row: 0 + None
    with pytest.raises(TypeError) as err:
        eng.values(st)
    frames = [f for f in traceback.extract_tb(err.value.__traceback__) if f.filename == name]
    assert frames and frames[-1].line  # the generated line is shown, not "<string>"
