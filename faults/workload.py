"""The harness's events: a seeded clickstream whose outcome does not depend on arrival order.

Event times span less than the view's allowed lateness and shortest horizon, so no event is
late however faults reorder delivery: the final state of an undisturbed run is the
reference. A fixed share of events is sent a second time, later, in another batch through
another door (``resend``): the same event arriving twice, which must count once.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

TYPES = ("impression", "impression", "click", "purchase")


@dataclass(frozen=True)
class Workload:
    events: list[dict[str, Any]]  # ingest-ready JSON envelopes, in send order
    resend_every: int  # every n-th event is sent again later (0: none)

    @property
    def ids(self) -> list[str]:
        return [e["event_id"] for e in self.events]

    @property
    def entities(self) -> list[str]:
        return sorted({e["data"]["user_id"] for e in self.events})


def clickstream(
    n: int,
    *,
    seed: int,
    start_ms: int,
    span_ms: int = 20 * 60_000,
    users: int = 500,
    items: int = 60,
    resend_every: int = 20,
    prefix: str = "f",
) -> Workload:
    """``n`` events over ``span_ms`` of event time from ``start_ms`` (out of order by up to a
    few seconds per entity, as real producers are)."""
    rng = random.Random(seed)
    events: list[dict[str, Any]] = []
    for i in range(n):
        typ = TYPES[rng.randrange(len(TYPES))]
        t = start_ms + (i * span_ms) // max(n, 1) - rng.randrange(5_000)
        data: dict[str, Any] = {
            "user_id": f"u{rng.randrange(users)}",
            "item_id": f"i{rng.randrange(items)}",
        }
        if typ == "purchase":
            data["amount"] = round(rng.uniform(1, 200), 2)
        events.append(
            {
                "event_id": f"{prefix}{seed}-{i}",
                "type": typ,
                "schema_version": 1,
                "event_time": max(t, start_ms),
                "producer_id": "faults",
                "data": data,
            }
        )
    return Workload(events, resend_every)
