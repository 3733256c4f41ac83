from __future__ import annotations

from services.governance.logic import (
    DecisionRequest,
    TTLCache,
    cache_key,
    interpret,
    policy_version,
)


def test_interpret_denies_unless_allow_is_true() -> None:
    assert interpret({"allow": True, "reasons": []}).allow
    r = interpret({"allow": False, "reasons": ["b", "a"]})
    assert not r.allow and r.reasons == ["a", "b"]
    assert interpret(None).reasons == ["policy returned no decision document"]
    assert interpret({"allow": "yes"}).reasons == ["denied by default"]


def test_cache_key_is_order_insensitive_and_version_bound() -> None:
    a = DecisionRequest("serve", "m", {"x": 1, "y": 2})
    b = DecisionRequest("serve", "m", {"y": 2, "x": 1})
    assert cache_key(a, "v1") == cache_key(b, "v1")
    assert cache_key(a, "v1") != cache_key(a, "v2")
    assert cache_key(a, "v1") != cache_key(DecisionRequest("promote", "m", a.input), "v1")


def test_policy_version_tracks_content() -> None:
    assert policy_version({"a.rego": "x"}) == policy_version({"a.rego": "x"})
    assert policy_version({"a.rego": "x"}) != policy_version({"a.rego": "y"})


def test_ttl_cache_expires_and_evicts() -> None:
    c = TTLCache(ttl_s=10, max_items=2)
    r = interpret({"allow": True})
    c.put("a", r, now=0)
    assert c.get("a", now=5) is r
    assert c.get("a", now=11) is None
    c.put("a", r, 0)
    c.put("b", r, 0)
    c.put("c", r, 0)
    assert c.get("a", 1) is None and c.get("c", 1) is r
