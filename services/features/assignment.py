"""Which EVENTS partitions a features worker should hold: pure logic, no I/O.

Every live worker computes the same fair share from the same member list: ``partitions //
members`` each, one more for the first ``partitions % members`` (members sorted). A worker
prefers the partitions ``p`` with ``p % members == its index``, so a stable membership
settles on a stable, even assignment; claiming takes only free partitions (a lease no one
holds), so two workers never take one partition from each other, and a worker above its
share gives back the partitions it does not prefer first.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Plan:
    release: tuple[int, ...]  # held now, to give back (stop them first, then release)
    claim: tuple[int, ...]  # free now, to try to take


def share(partitions: int, members: list[str], me: str) -> int:
    """How many partitions ``me`` should hold."""
    ranked = sorted(set(members) | {me})
    i = ranked.index(me)
    base, extra = divmod(partitions, len(ranked))
    return base + (1 if i < extra else 0)


def preferred(partitions: int, members: list[str], me: str) -> list[int]:
    ranked = sorted(set(members) | {me})
    i, n = ranked.index(me), len(ranked)
    return [p for p in range(partitions) if p % n == i]


def plan(partitions: int, members: list[str], me: str, held: set[int], taken: set[int]) -> Plan:
    """``held``: the partitions ``me`` holds; ``taken``: those anyone holds (``held``
    included)."""
    target = share(partitions, members, me)
    mine = preferred(partitions, members, me)
    if len(held) > target:
        # give back what is not preferred first, the highest partitions first
        order = sorted(held, key=lambda p: (p in mine, -p))
        return Plan(tuple(order[: len(held) - target]), ())
    free = [p for p in range(partitions) if p not in taken]
    free.sort(key=lambda p: (p not in mine, p))
    return Plan((), tuple(free[: target - len(held)]))
