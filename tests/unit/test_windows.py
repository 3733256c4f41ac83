from __future__ import annotations

import pytest

from myelin.contracts.events import ClickV1, ImpressionV1, PurchaseV1
from services.features.logic import EntityState, Outcome, WindowEngine
from services.features.views import USER_ACTIVITY, Feature, FeatureView

MIN = 60_000
T0 = 1_800_000_000_000 - (1_800_000_000_000 % MIN)  # bucket-aligned
IMP = ImpressionV1(user_id="u", item_id="i")
CLK = ClickV1(user_id="u", item_id="i")


def buy(amount: float) -> PurchaseV1:
    return PurchaseV1(user_id="u", item_id="i", amount=amount)


def test_hand_computed_sliding_windows() -> None:
    eng = WindowEngine(USER_ACTIVITY)
    st = EntityState()
    # t=0: 2 impressions, 1 click; t=20m: 1 impression + purchase 10; t=55m: 1 impression + purchase 5
    events = [
        ("impression", 0, IMP),
        ("impression", 1, IMP),
        ("click", 2, CLK),
        ("impression", 20 * MIN, IMP),
        ("purchase", 20 * MIN + 5, buy(10)),
        ("impression", 55 * MIN, IMP),
        ("purchase", 55 * MIN, buy(5)),
    ]
    for seq, (typ, dt, payload) in enumerate(events, start=1):
        assert eng.apply(st, seq, typ, T0 + dt, payload) == Outcome.APPLIED
    v = eng.vector(st)
    # 10-minute window at t=55m covers buckets (45m, 55m]: one impression
    assert v["impressions_10m"] == 1 and v["clicks_10m"] == 0 and v["ctr_10m"] == 0.0
    # 1-hour window covers everything since t=0
    assert v["impressions_1h"] == 4 and v["clicks_1h"] == 1 and v["ctr_1h"] == 0.25
    assert v["purchases_1h"] == 2 and v["spend_1h"] == 15.0
    # advance to t=61m: buckets 0 and 1 min fall out of the hour
    assert eng.apply(st, 99, "click", T0 + 61 * MIN, CLK) == Outcome.APPLIED
    v = eng.vector(st)
    assert v["impressions_1h"] == 2 and v["clicks_1h"] == 1 and v["ctr_1h"] == 0.5
    assert v["spend_1h"] == 15.0


def test_redelivered_event_changes_nothing() -> None:
    eng = WindowEngine(USER_ACTIVITY)
    st = EntityState()
    eng.apply(st, 5, "click", T0, CLK)
    before = eng.vector(st)
    assert eng.apply(st, 5, "click", T0, CLK) == Outcome.DUPLICATE
    assert eng.apply(st, 3, "click", T0, CLK) == Outcome.DUPLICATE
    assert eng.vector(st) == before


def test_late_event_is_counted_not_applied() -> None:
    eng = WindowEngine(USER_ACTIVITY)
    st = EntityState()
    eng.apply(st, 1, "click", T0 + 120 * MIN, CLK)
    assert eng.apply(st, 2, "click", T0, CLK) == Outcome.LATE
    assert st.late == 1
    assert eng.vector(st)["clicks_1h"] == 1
    # out of order but inside the window: applied
    assert eng.apply(st, 3, "click", T0 + 100 * MIN, CLK) == Outcome.APPLIED
    assert eng.vector(st)["clicks_1h"] == 2


def test_state_round_trips() -> None:
    eng = WindowEngine(USER_ACTIVITY)
    st = EntityState()
    eng.apply(st, 1, "purchase", T0, buy(3.5))
    eng.apply(st, 2, "impression", T0 + MIN, IMP)
    back = EntityState.decode(st.encode())
    assert back == st
    assert eng.vector(back) == eng.vector(st)


def test_view_hash_changes_with_definition() -> None:
    v2 = FeatureView(
        USER_ACTIVITY.name,
        USER_ACTIVITY.entity,
        USER_ACTIVITY.sources,
        (*USER_ACTIVITY.features, Feature("clicks_2h", "count", 7200, "click")),
    )
    assert v2.content_hash != USER_ACTIVITY.content_hash
    assert (
        USER_ACTIVITY.content_hash
        == FeatureView(
            USER_ACTIVITY.name, USER_ACTIVITY.entity, USER_ACTIVITY.sources, USER_ACTIVITY.features
        ).content_hash
    )


@pytest.mark.parametrize(
    "features",
    [
        (Feature("a", "count", 60, "nope"),),
        (Feature("a", "count", 90, "click"),),
        (Feature("a", "sum", 60, "purchase"),),
        (Feature("a", "count", 600, "click", window="session"),),
        (Feature("r", "ratio", numerator="x", denominator="y"),),
        (Feature("a", "count", 60, "click"), Feature("a", "count", 120, "click")),
    ],
)
def test_invalid_views_are_refused(features: tuple[Feature, ...]) -> None:
    with pytest.raises(ValueError, match="view v"):
        FeatureView("v", "user_id", ("click", "purchase"), features)


def view_of(*features: Feature) -> WindowEngine:
    return WindowEngine(FeatureView("v", "user_id", ("impression", "click", "purchase"), features))


def test_mean_min_max_last_stddev_by_hand() -> None:
    eng = view_of(
        Feature("mean", "mean", 3600, "purchase", field="amount"),
        Feature("min", "min", 3600, "purchase", field="amount"),
        Feature("max", "max", 3600, "purchase", field="amount"),
        Feature("last", "last", 3600, "purchase", field="amount"),
        Feature("sd", "stddev", 3600, "purchase", field="amount"),
        Feature("n", "count", 3600, "purchase"),
    )
    st = EntityState()
    for seq, (dt, amount) in enumerate([(0, 2.0), (5 * MIN, 4.0), (3 * MIN, 9.0)], start=1):
        eng.apply(st, seq, "purchase", T0 + dt, buy(amount))  # the last by event time is 4.0
    v = eng.vector(st)
    assert v["n"] == 3 and v["mean"] == pytest.approx(5.0)
    assert (v["min"], v["max"], v["last"]) == (2.0, 9.0, 4.0)
    assert v["sd"] == pytest.approx(((9 + 1 + 16) / 3) ** 0.5)  # population stddev of 2, 4, 9
    empty = eng.vector(EntityState())
    assert empty["n"] == 0 and all(
        empty[k] != empty[k] for k in ("mean", "min", "max", "last", "sd")
    )


def test_distinct_is_exact_when_small_and_close_when_large() -> None:
    eng = view_of(Feature("d", "distinct", 3600, "impression", field="item_id"))
    st = EntityState()
    for i in range(40):
        eng.apply(
            st, i + 1, "impression", T0 + i * 1000, ImpressionV1(user_id="u", item_id=f"i{i % 20}")
        )
    assert eng.vector(st)["d"] == 20
    for i in range(5000):
        eng.apply(
            st, 100 + i, "impression", T0 + 50_000 + i, ImpressionV1(user_id="u", item_id=f"x{i}")
        )
    assert eng.vector(st)["d"] == pytest.approx(5020, rel=0.35)  # KMV with k=64


def test_tumbling_window_resets_at_the_block_boundary() -> None:
    eng = view_of(Feature("hour", "count", 3600, "click", window="tumbling"))
    st = EntityState()
    hour = T0 - T0 % 3_600_000
    eng.apply(st, 1, "click", hour + 50 * MIN, CLK)
    eng.apply(st, 2, "click", hour + 59 * MIN, CLK)
    assert eng.vector(st)["hour"] == 2
    eng.apply(st, 3, "click", hour + 61 * MIN, CLK)  # a new clock hour
    assert eng.vector(st)["hour"] == 1


def test_session_window_ends_at_a_gap() -> None:
    eng = view_of(Feature("s", "count", 3600, "click", window="session", gap_s=600))
    st = EntityState()
    for seq, minute in enumerate([0, 5, 9, 30, 35], start=1):  # gap 9 -> 30 exceeds 10 minutes
        eng.apply(st, seq, "click", T0 + minute * MIN, CLK)
    assert eng.vector(st)["s"] == 2
    eng.apply(st, 9, "impression", T0 + 44 * MIN, IMP)  # activity keeps the session open
    eng.apply(st, 10, "click", T0 + 52 * MIN, CLK)
    assert eng.vector(st)["s"] == 3


ALL_KINDS = (
    Feature("n10", "count", 600, "impression"),
    Feature("sum1h", "sum", 3600, "purchase", field="amount"),
    Feature("mean1h", "mean", 3600, "purchase", field="amount"),
    Feature("sd20", "stddev", 1200, "purchase", field="amount"),
    Feature("min30", "min", 1800, "purchase", field="amount"),
    Feature("max1h", "max", 3600, "purchase", field="amount"),
    Feature("last1h", "last", 3600, "purchase", field="amount"),
    Feature("d1h", "distinct", 3600, "impression", field="item_id"),
    Feature("hour", "count", 3600, "click", window="tumbling"),
    Feature("sess", "count", 3600, "click", window="session", gap_s=300),
    Feature("r", "ratio", numerator="hour", denominator="n10"),
)


def test_the_cached_vector_equals_a_recomputation_bit_for_bit() -> None:
    """Window aggregates of all but the newest bucket are cached on the state and rolled
    forward when a new bucket opens; a restarted state (no cache) must compute exactly the
    same floats, for every aggregation and window kind, in any arrival order. min, max and
    last are also checked against a brute-force reading of the events in the window."""
    import math
    import random

    import msgspec

    rng = random.Random(7)
    eng = view_of(*ALL_KINDS)
    names = eng.view.feature_names
    states: dict[str, EntityState] = {}
    applied: dict[str, list[tuple[int, float]]] = {}  # purchases: (event time, amount)
    cached = 0
    for i in range(20_000):
        user = f"u{rng.randrange(40)}"
        typ = rng.choice(["impression", "impression", "click", "purchase"])
        amount = round(rng.random() * 100, 2)
        payload = (
            buy(amount)
            if typ == "purchase"
            else ImpressionV1(user_id=user, item_id=f"i{rng.randrange(300)}")
            if typ == "impression"
            else CLK
        )
        t = T0 + i * 400 + rng.choice([0, 0, 0, 0, -rng.randrange(3_000_000)])
        st = states.setdefault(user, EntityState())
        if eng.apply(st, i + 1, typ, t, payload) == Outcome.APPLIED and typ == "purchase":
            applied.setdefault(user, []).append((t, amount))
        cached += st.rest is not None
        live = eng.values(st)
        blob = st.encode()  # reuses the encodings of unchanged buckets ...
        assert blob == msgspec.msgpack.encode(st.to_list())  # ... and is the whole state
        again = eng.values(EntityState.decode(blob))
        assert all(
            a == b or (math.isnan(a) and math.isnan(b)) for a, b in zip(live, again, strict=True)
        ), (i, list(zip(names, live, again, strict=True)))
        current = st.watermark // MIN
        in_30 = [x for tt, x in applied.get(user, []) if current - tt // MIN < 30]
        in_60 = [(tt, x) for tt, x in applied.get(user, []) if current - tt // MIN < 60]
        v = dict(zip(names, live, strict=True))
        assert v["min30"] == min(in_30) if in_30 else math.isnan(v["min30"])
        assert v["max1h"] == max(x for _, x in in_60) if in_60 else math.isnan(v["max1h"])
        if in_60:
            newest = max(tt for tt, _ in in_60)
            assert v["last1h"] in {x for tt, x in in_60 if tt == newest}
    assert cached > 5_000  # the fast path was exercised


def test_sketch_merges_equal_the_set_definition() -> None:
    import random

    from services.features.slots import KMV_K
    from services.features.vector_code import _distinct, _distinct_with, _kmv_merge, _kmv_rest

    rng = random.Random(7)
    for _ in range(3000):
        pool = rng.choice([40, 200, 2**32])  # overlapping hashes are common in small pools
        a = sorted(set(rng.randrange(pool) for _ in range(rng.randrange(0, 90))))[:KMV_K]
        b = sorted(set(rng.randrange(pool) for _ in range(rng.randrange(0, 90))))[:KMV_K]
        expected = sorted(set(a) | set(b))[:KMV_K]
        assert _kmv_merge(a, b) == expected
        assert _distinct_with(_kmv_rest(a), b) == _distinct(expected)


def test_array_headers_match_msgpack() -> None:
    import msgspec

    from services.features.logic import _array_header

    for n in (0, 1, 15, 16, 17, 65_535, 65_536, 70_000):
        assert _array_header(n) == msgspec.msgpack.encode([None] * n)[: len(_array_header(n))]
        assert msgspec.msgpack.decode(_array_header(n) + b"\xc0" * n) == [None] * n


def test_sparse_events_roll_the_cache_across_window_boundaries() -> None:
    """Gaps around the session gap, window lengths and hour boundaries: the rolled cache
    (which keeps a window's start without listing the buckets when it can) must equal a
    recomputation at every step."""
    import math
    import random

    import msgspec

    gaps = [
        0,
        1,
        59,
        60,
        61,
        4 * 60,
        5 * 60,
        6 * 60,
        9 * 60,
        10 * 60,
        11 * 60,
        19 * 60,
        20 * 60,
        21 * 60,
    ]
    gaps += [29 * 60, 30 * 60, 31 * 60, 59 * 60, 60 * 60, 61 * 60]  # seconds
    eng = view_of(*ALL_KINDS)
    rolled = 0
    for seed in range(30):
        rng = random.Random(seed)
        st = EntityState()
        t = T0 + rng.randrange(60) * MIN + rng.randrange(MIN)
        for i in range(300):
            t += rng.choice(gaps) * 1000 + rng.randrange(0, 1000)
            typ = rng.choice(["impression", "click", "purchase"])
            payload = (
                buy(float(i % 17)) if typ == "purchase" else IMP if typ == "impression" else CLK
            )
            before = st.rest
            eng.apply(st, i + 1, typ, t, payload)
            live = eng.values(st)
            rolled += before is not None and st.rest is not None and st.rest is not before
            again = eng.values(EntityState.decode(msgspec.msgpack.encode(st.to_list())))
            assert all(
                a == b or (math.isnan(a) and math.isnan(b))
                for a, b in zip(live, again, strict=True)
            ), (seed, i, live, again)
    assert rolled > 3000  # the roll, not a recomputation, produced most vectors
