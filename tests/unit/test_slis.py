"""The in-memory SLI percentiles the health replies carry."""

from __future__ import annotations

from myelin import slis


def test_recent_percentiles() -> None:
    assert slis.percentiles([]) == {"n": 0}
    xs = [i / 1000 for i in range(1, 101)]  # 1 .. 100 ms
    assert slis.percentiles(xs) == {"n": 100, "p50": 50.0, "p99": 99.0, "max": 100.0}
    assert slis.percentiles(xs[:10])["p99"] == 10.0  # nearest rank: ceil(0.99 n)
    assert slis.percentiles([0.002]) == {"n": 1, "p50": 2.0, "p99": 2.0, "max": 2.0}


def test_timed_requests_show_in_the_recent_window() -> None:
    for _ in range(3):
        with slis.timed("unit-test-rpc"):
            pass
    got = slis.recent()["latency_ms"]["unit-test-rpc"]
    assert got["n"] == 3 and 0 <= got["p50"] <= got["p99"] <= got["max"] < 1000
    try:
        with slis.timed("unit-test-rejected") as sli:
            sli["outcome"] = "rejected"
            raise ValueError("bad input")
    except ValueError:
        pass
    assert slis.recent()["latency_ms"]["unit-test-rejected"]["n"] == 1
    slis.record_freshness("v@unit", 0.25)
    assert slis.recent()["freshness_ms"]["v@unit"]["p99"] == 250.0
