"""A synthetic e-commerce clickstream with a learnable signal.

Each user has a latent click propensity and a purchase propensity. Sessions show items;
an impression is clicked with the user's propensity (less further down the list), a
click sometimes leads to a purchase. A user's recent click-through rate is therefore
predictive of the next click, which is what the demo model learns from the platform's
own offline store. Deterministic for a given seed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

CLICK_WINDOW_S = 60  # an impression is labelled clicked if clicked within this


def email_of(user: int) -> str:
    """The synthetic buyer's e-mail: PII, tokenized by ingest before anything stores it."""
    return f"shopper.{user:05d}@mail.example"


@dataclass(frozen=True)
class Stream:
    events: list[dict[str, Any]]  # valid events, in event-time order
    bad: list[Any]  # deliberately invalid events, each with a different defect
    start_ms: int
    end_ms: int


def generate(
    n_events: int,
    now_ms: int,
    *,
    users: int = 2000,
    items: int = 500,
    span_s: int = 3 * 3600,
    seed: int = 7,
) -> Stream:
    rng = random.Random(seed)
    start = now_ms - span_s * 1000
    end = now_ms - 5_000
    click_p = [rng.betavariate(1.2, 5.0) for _ in range(users)]
    buy_p = [rng.betavariate(1.0, 8.0) for _ in range(users)]
    events: list[dict[str, Any]] = []
    seq = 0

    def add(t: int, type_: str, data: dict[str, Any], version: int = 1) -> None:
        nonlocal seq
        seq += 1
        events.append(
            {
                "event_id": f"ev-{seed}-{seq:08d}",
                "type": type_,
                "schema_version": version,
                "event_time": t,
                "producer_id": "demo-web",
                "client_version": "demo/1",
                "data": data,
            }
        )

    while len(events) < n_events:
        u = rng.randrange(users)
        user = f"user-{u:05d}"
        t = rng.randrange(start, end - 600_000)
        for pos in range(rng.randint(3, 12)):
            t += rng.randint(1_000, 20_000)
            item = f"item-{rng.randrange(items):04d}"
            add(t, "impression", {"user_id": user, "item_id": item, "position": pos})
            if rng.random() < click_p[u] * (1.0 - 0.05 * pos):
                tc = t + rng.randint(2_000, 30_000)
                add(tc, "click", {"user_id": user, "item_id": item})
                if rng.random() < buy_p[u]:
                    amount = round(rng.lognormvariate(3.0, 0.8), 2)
                    add(
                        tc + rng.randint(10_000, 120_000),
                        "purchase",
                        {
                            "user_id": user,
                            "item_id": item,
                            "amount": amount,
                            "currency": "EUR",
                            "email": email_of(u),
                        },
                        version=2,
                    )
    events = events[:n_events]
    events.sort(key=lambda e: e["event_time"])
    bad: list[Any] = [
        {**events[0], "event_id": "bad-type", "data": {"user_id": 42, "item_id": "item-1"}},
        {**events[1], "event_id": "bad-unknown", "type": "page_view"},
        {**events[2], "event_id": "bad-version", "schema_version": 9},
        {**events[3], "event_id": "bad-future", "event_time": now_ms + 3_600_000},
        {**events[4], "event_id": "bad-missing", "data": {"item_id": "item-1"}},
        {
            **events[5],
            "event_id": "bad-amount",
            "type": "purchase",
            "schema_version": 2,
            "data": {
                "user_id": "user-00001",
                "item_id": "item-1",
                "amount": -5,
                "email": email_of(1),
            },
        },
        {**events[6], "event_id": "bad-big", "data": {"user_id": "u" * 200, "item_id": "i"}},
        "not an object",
    ]
    return Stream(events, bad, start, end)
