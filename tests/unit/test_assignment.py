"""The fair share of partitions among features workers (pure logic)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from services.features.assignment import plan, share


def test_shares_add_up_and_differ_by_at_most_one() -> None:
    members = ["a", "b", "c"]
    shares = [share(8, members, m) for m in members]
    assert shares == [3, 3, 2] and sum(shares) == 8


def test_a_lone_worker_claims_everything_free() -> None:
    assert plan(8, ["a"], "a", set(), set()).claim == tuple(range(8))


def test_a_worker_above_its_share_gives_back_what_it_does_not_prefer() -> None:
    # b joined: a (index 0 of 2) prefers the even partitions and keeps 4 of them
    got = plan(8, ["a", "b"], "a", set(range(8)), set(range(8)))
    assert sorted(got.release) == [1, 3, 5, 7] and got.claim == ()


def test_claims_only_free_partitions_preferred_first() -> None:
    got = plan(8, ["a", "b"], "b", set(), {0, 2, 4, 6, 1})
    assert got.claim == (3, 5, 7)  # 1 is taken: b waits for a to give it back


@given(
    st.integers(1, 64),
    st.lists(st.text("abcdefgh", min_size=1, max_size=3), min_size=1, max_size=8, unique=True),
)
def test_the_assignment_settles_on_every_partition_held_once(
    partitions: int, members: list[str]
) -> None:
    """Ticking every member in turn converges: each partition held by exactly one member,
    shares within one of each other."""
    held: dict[str, set[int]] = {m: set() for m in members}
    for _ in range(4):
        for m in members:
            taken = set().union(*held.values())
            todo = plan(partitions, members, m, held[m], taken)
            held[m] -= set(todo.release)
            held[m] |= set(todo.claim)
    owners = [m for m in members for _p in held[m]]
    assert len(owners) == partitions
    assert set().union(*held.values()) == set(range(partitions))
    sizes = [len(h) for h in held.values()]
    assert max(sizes) - min(sizes) <= 1
