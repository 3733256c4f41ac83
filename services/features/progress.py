"""Where a feature view version stands as a whole, whichever workers own its partitions.

Each partition has its own position in Redis (the last stream sequence of that partition
applied). The version's position is the stream sequence up to which *every* partition is
applied: the stream's last sequence when no partition lags, else the lowest position of
a lagging partition (a partition lags when its subject holds a message beyond its
position). ``position >= last sequence`` therefore still means "caught up", as it did
with one consumer per version.

Read in this order (stream, then subjects, then positions) so that a message published
meanwhile can only make the answer lower, never claim it applied.
"""

from __future__ import annotations

from dataclasses import dataclass

import redis.asyncio as aioredis
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from myelin import online
from myelin.subjects import EVENTS_STREAM, event_subject


@dataclass(frozen=True, slots=True)
class Progress:
    position: int  # every partition applied up to here
    lag_messages: int  # stream messages after it (an upper bound of what is left)
    positions: tuple[int, ...]  # per partition
    lagging: tuple[int, ...]  # partitions with messages beyond their position


async def subject_last_seqs(js: JetStreamContext, partitions: int) -> tuple[int, list[int]]:
    """The stream's last sequence, then each partition subject's (0: no message)."""
    last = int((await js.stream_info(EVENTS_STREAM)).state.last_seq)
    per: list[int] = []
    for p in range(partitions):
        try:
            msg = await js.get_last_msg(EVENTS_STREAM, event_subject(p))
            per.append(int(msg.seq or 0))
        except NotFoundError:
            per.append(0)
    return last, per


async def stored_positions(
    r: aioredis.Redis, view: str, version: str, partitions: int
) -> list[int]:
    async with r.pipeline(transaction=False) as pipe:  # one slot per key: cluster-safe
        for p in range(partitions):
            pipe.get(online.position_key(view, version, p))
        raw = await pipe.execute()
    return [int(x) if x else 0 for x in raw]


def combine(last: int, subject_last: list[int], positions: list[int]) -> Progress:
    lagging = tuple(
        p for p, (s, pos) in enumerate(zip(subject_last, positions, strict=True)) if pos < s
    )
    position = min([last, *(positions[p] for p in lagging)])
    return Progress(position, max(0, last - position), tuple(positions), lagging)
