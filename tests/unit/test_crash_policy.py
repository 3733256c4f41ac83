"""The supervisor's restart policy as pure logic: backoff, jitter, the crash window and
when it gives up."""

from __future__ import annotations

import random

import pytest

from myelin.errors import ConfigError
from myelin.stack.crash_policy import CrashPolicy


def test_backoff_doubles_up_to_the_cap_then_gives_up() -> None:
    p = CrashPolicy(max_crashes=7, window_s=300, backoff_s=0.5, max_backoff_s=10, jitter=0)
    delays = [p.record(float(t)) for t in range(7)]
    assert [d.delay_s for d in delays] == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    assert [d.crash for d in delays] == [1, 2, 3, 4, 5, 6, 7]
    assert not any(d.give_up for d in delays)
    last = p.record(7.0)
    assert last.give_up and last.crash == 8 and last.delay_s == 0


def test_default_allows_five_crashes_in_300_s() -> None:
    p = CrashPolicy()
    assert [p.record(t).give_up for t in (0, 10, 20, 30, 40)] == [False] * 5
    assert p.record(50).give_up


def test_crashes_older_than_the_window_are_forgotten() -> None:
    p = CrashPolicy(max_crashes=2, window_s=60, backoff_s=1, max_backoff_s=8, jitter=0)
    assert p.record(0).delay_s == 1
    assert p.record(30).delay_s == 2
    # the crash at 0 left the window: two crashes inside it, still allowed
    d = p.record(61)
    assert (d.crash, d.give_up, d.delay_s) == (2, False, 2)
    assert p.crashes(61) == 2
    assert p.record(62).give_up  # three within 60 s
    # long stable: the backoff starts over
    assert p.crashes(1000) == 0
    assert p.record(1000).delay_s == 1


def test_jitter_only_shortens_the_wait() -> None:
    p = CrashPolicy(max_crashes=1000, window_s=1e9, jitter=0.2, rng=random.Random(7))
    delays = [p.record(float(t)).delay_s for t in range(200)]
    nominal = [min(10.0, 0.5 * 2**n) for n in range(200)]
    assert all(0.8 * n <= d <= n for d, n in zip(delays, nominal, strict=True))
    assert len({round(d, 6) for d in delays[10:]}) > 100  # at the cap, still spread out


def test_zero_crashes_allowed_gives_up_at_once() -> None:
    assert CrashPolicy(max_crashes=0).record(0).give_up


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_crashes": -1},
        {"window_s": 0},
        {"backoff_s": 2, "max_backoff_s": 1},
        {"backoff_s": -1},
        {"jitter": 1.0},
    ],
)
def test_bad_limits_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ConfigError):
        CrashPolicy(**kwargs)  # type: ignore[arg-type]
