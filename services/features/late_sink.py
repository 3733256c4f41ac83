"""Outbound adapter: events too late for a view's windows go to the LATE stream.

Messages of up to ``CHUNK_EVENTS`` late events of one batch and view
(:class:`~myelin.records.LateEvents`, msgpack); their ids derive from the batch's sequences,
so a replayed batch publishes them once. The same events stay in ClickHouse's raw history
(the warehouse drains this stream: ``late = 1``) and are counted in the features status.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import msgspec

from myelin.bus import OutMsg, Publisher, raise_unless_stored
from myelin.contracts import StreamEvent
from myelin.records import LateEvents
from myelin.subjects import late_subject

_mp = msgspec.msgpack.Encoder()
CHUNK_EVENTS = 1000  # a NATS message is capped (1 MB by default); events are ~0.2 KB

LateSink = Callable[[str, list[tuple[int, StreamEvent]]], Awaitable[None]]


def late_publisher(pub: Publisher) -> LateSink:
    async def publish(view: str, events: list[tuple[int, StreamEvent]]) -> None:
        first, last = events[0][0], events[-1][0]
        msgs = [
            OutMsg(
                late_subject(view),
                _mp.encode(
                    LateEvents(
                        view=view,
                        seqs=[s for s, _ in chunk],
                        events=[e for _, e in chunk],
                    )
                ),
                f"late:{view}:{first}-{last}:{k // CHUNK_EVENTS}",
            )
            for k in range(0, len(events), CHUNK_EVENTS)
            for chunk in [events[k : k + CHUNK_EVENTS]]
        ]
        # stored before the batch commits; a refusal stops the view (never retried forever)
        raise_unless_stored(await pub.publish_batch(msgs), "LATE stream")

    return publish
