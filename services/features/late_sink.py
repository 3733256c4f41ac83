"""Outbound adapter: events too late for a view's windows go to the LATE stream.

One message per batch and view (a msgpack list of the late events); its id is derived from
the events' sequences, so a replayed batch publishes it once. The same events stay in
ClickHouse's raw history (the warehouse drains this stream: ``late = 1``) and are counted
in the features status.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import msgspec

from myelin.bus import OutMsg, Publisher
from myelin.contracts import StreamEvent
from myelin.errors import Retryable
from myelin.subjects import late_subject

_mp = msgspec.msgpack.Encoder()
SEQS_HEADER = "Myelin-Event-Seqs"  # the events' sequences, comma-separated (for raw history)


def late_publisher(
    pub: Publisher,
) -> Callable[[str, list[tuple[int, StreamEvent]]], Awaitable[None]]:
    async def publish(view: str, events: list[tuple[int, StreamEvent]]) -> None:
        first, last = events[0][0], events[-1][0]
        msg = OutMsg(
            late_subject(view),
            _mp.encode([e for _, e in events]),
            f"late:{view}:{first}-{last}",
            headers={SEQS_HEADER: ",".join(str(s) for s, _ in events)},
        )
        result = await pub.publish(msg)
        if not result.ok:
            raise Retryable(f"LATE stream unavailable: {result.error}")  # the batch is retried

    return publish
