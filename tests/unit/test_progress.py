"""Where a view version stands when its partitions are applied separately (pure)."""

from __future__ import annotations

from services.features.progress import combine


def test_caught_up_when_no_partition_lags() -> None:
    # partition 2 never had a message; the others are applied to their last message
    got = combine(100, [100, 97, 0], [100, 97, 0])
    assert (got.position, got.lag_messages, got.lagging) == (100, 0, ())


def test_the_lowest_lagging_partition_holds_the_version_back() -> None:
    got = combine(100, [100, 98, 60], [90, 98, 40])
    assert got.lagging == (0, 2) and got.position == 40 and got.lag_messages == 60


def test_positions_read_after_newer_messages_are_capped_at_the_stream_read_first() -> None:
    # positions are read last: a partition may be applied beyond what the stream read said
    # its end was; the version still claims no more than that earlier end
    got = combine(100, [100, 99], [104, 99])
    assert (got.position, got.lag_messages, got.lagging) == (100, 0, ())
