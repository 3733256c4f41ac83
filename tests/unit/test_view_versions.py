from __future__ import annotations

import pytest

from services.features.versions import VersionError, VersionState, parse_ref, promotion_input
from services.features.views import USER_ACTIVITY, InvalidView, view_doc, view_from_doc
from services.inference.predict_batch import pinned_version


def test_a_definition_round_trips_to_the_same_version() -> None:
    back = view_from_doc(view_doc(USER_ACTIVITY))
    assert back == USER_ACTIVITY and back.content_hash == USER_ACTIVITY.content_hash
    changed = view_doc(USER_ACTIVITY)
    changed["ttl_s"] = 7200
    assert view_from_doc(changed).content_hash != USER_ACTIVITY.content_hash


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"ttl_s": "1h"}, "Expected `int`, got `str` - at `$.ttl_s`"),
        ({"colour": "red"}, "unknown field `colour`"),
        ({"name": "User Activity"}, "use a-z, 0-9 and _"),
        ({"features": []}, "no features"),
        ({"ttl_s": 60}, "shorter than its longest window"),
        (
            {"features": [{"name": "n", "kind": "median", "window_s": 60, "source": "click"}]},
            "Invalid enum value 'median' - at `$.features[0].kind`",
        ),
        (
            {"features": [{"name": "n", "kind": "count", "window_s": 60, "source": "refund"}]},
            "reads 'refund', not a source",
        ),
    ],
)
def test_bad_definitions_are_refused_precisely(patch: dict[str, object], message: str) -> None:
    doc = {**view_doc(USER_ACTIVITY), **patch}
    with pytest.raises(InvalidView) as err:
        view_from_doc(doc)
    assert message in err.value.message


def test_refs_and_pins() -> None:
    assert parse_ref("user_activity@abc") == ("user_activity", "abc")
    assert parse_ref("user_activity") == ("user_activity", "")
    with pytest.raises(VersionError):
        parse_ref("@abc")
    assert pinned_version("user_activity", ["other@1", "user_activity@abc"]) == "abc"
    assert pinned_version("user_activity", ["user_activity"]) == ""


def test_promotion_input_measures_lag_and_feature_changes() -> None:
    doc = view_doc(USER_ACTIVITY)
    doc["features"] = [f for f in doc["features"] if f["name"] != "max_spend_1h"] + [
        {"name": "clicks_5m", "kind": "count", "window_s": 300, "source": "click"}
    ]
    new = view_from_doc(doc)
    got = promotion_input(
        VersionState(new, 90, False), VersionState(USER_ACTIVITY, 120, True), 130, "ops"
    )
    assert got["lag_messages"] == 40 and got["behind_served_messages"] == 30
    assert got["features_added"] == ["clicks_5m"] and got["features_removed"] == ["max_spend_1h"]
    assert got["served_version"] == USER_ACTIVITY.content_hash
    first = promotion_input(VersionState(new, 5, False), None, 5, "ops")
    assert first["lag_messages"] == 0 and first["served_version"] == ""
