"""A synthetic e-commerce clickstream with a learnable signal, and a flash sale that shifts it.

Each user has a latent click propensity and a purchase propensity. Sessions show items;
an impression is clicked with the user's propensity (less further down the list), a
click sometimes leads to a purchase. A user's recent click-through rate is therefore
predictive of the next click, which is what the demo model learns from the platform's
own offline store. Deterministic for a given seed.

:func:`generate` is the plain stream (tests use it). :func:`demo_stream` is the demo's: a
first half of normal traffic over four hours (sessions of a fast feed: an item every
~1.7 s), whose newest part the demo replays with a Predict before each impression; then a
second half in which a *flash sale* starts: a quarter of the users binge (sessions of
15-40 items, one every ~0.6 s, back to back with a pause of 20-90 s) and click more (their
propensity x1.6, no fatigue down the list). The second half is ingested in bulk; then
the sale goes on live (:class:`Surge` makes it on demand), in real time, so that every
score has a future of real clicks to be judged by.
"""

from __future__ import annotations

import heapq
import random
from dataclasses import dataclass
from typing import Any

CLICK_WINDOW_S = 60  # an impression is labelled clicked if clicked within this (generate)

# The demo stream's sessions are a fast feed: every click comes within 2.5 s of its
# impression, so training labels need a short window, and a short window keeps the
# bounded retraining set close to its bound (impressions whose window had not closed at
# the bound are left out).
FEED_CLICK_WINDOW_S = 5
# An inference's outcome: a click by the same user within this after the score. The model
# scores an impression, the outcome is about its user: a window as short as the sale's
# clicks are quick (0.3-1.2 s) keeps the two close (a binging user sees an item every
# ~0.6 s, so a longer window would count the clicks on the next items too).
OUTCOME_WINDOW_S = 1
# The longest window of the demo's view: until it has passed, users' 1h counts are still
# filling up, and training rows from that first hour would describe a stream that has just
# started, not the steady traffic the model serves (left in, they moved W1 on
# impressions_1h by ~0.16 on normal traffic).
WARM_UP_S = 3600
HOT_SHARE = 0.25  # the users the sale makes binge
# Events a second of the sale, a little under what it makes (~255 with 500 hot users): the
# first half ends early enough for the sale's second half to come after it.
SURGE_EVENTS_PER_S = 240.0


def email_of(user: int) -> str:
    """The synthetic buyer's e-mail: PII, tokenized by ingest before anything stores it."""
    return f"shopper.{user:05d}@mail.example"


@dataclass(frozen=True)
class Regime:
    """What sessions look like (times in ms)."""

    name: str
    impressions: tuple[int, int]  # per session
    gap_ms: tuple[int, int]  # before each impression
    click_ms: tuple[int, int]  # from an impression to its click
    purchase_ms: tuple[int, int]  # from a click to its purchase
    fatigue: float  # click probability lost per position down the list (relative)
    lift: float  # multiplies the user's click propensity
    pause_ms: tuple[int, int] = (0, 0)  # between a user's sessions (surge: back to back)


# generate()'s sessions, as they always were
CLASSIC = Regime("classic", (3, 12), (1_000, 20_000), (2_000, 30_000), (10_000, 120_000), 0.05, 1.0)
NORMAL = Regime("normal", (3, 12), (300, 3_000), (300, 2_500), (2_000, 20_000), 0.05, 1.0)
SALE = Regime(
    "flash sale",
    (15, 40),
    (300, 900),
    (300, 1_200),
    (2_000, 20_000),
    0.0,
    1.6,
    pause_ms=(20_000, 90_000),
)


class Clickstream:
    """Users, items and sessions; event ids numbered in the order events are made."""

    def __init__(self, *, users: int = 2000, items: int = 500, seed: int = 7) -> None:
        self.rng = random.Random(seed)
        self.seed = seed
        self.users = users
        self.items = items
        self.click_p = [self.rng.betavariate(1.2, 5.0) for _ in range(users)]
        self.buy_p = [self.rng.betavariate(1.0, 8.0) for _ in range(users)]
        self._seq = 0

    def event(self, t: int, type_: str, data: dict[str, Any], version: int = 1) -> dict[str, Any]:
        self._seq += 1
        return {
            "event_id": f"ev-{self.seed}-{self._seq:08d}",
            "type": type_,
            "schema_version": version,
            "event_time": t,
            "producer_id": "demo-web",
            "client_version": "demo/1",
            "data": data,
        }

    def session(
        self, u: int, t: int, regime: Regime, rng: random.Random | None = None
    ) -> list[tuple[int, str, dict[str, Any], int]]:
        """One session of user ``u`` from ``t``: ``(time, type, data, schema version)``,
        in the order they were drawn (clicks come after their impression)."""
        r = rng or self.rng
        user = f"user-{u:05d}"
        out: list[tuple[int, str, dict[str, Any], int]] = []
        p = min(0.95, self.click_p[u] * regime.lift)
        for pos in range(r.randint(*regime.impressions)):
            t += r.randint(*regime.gap_ms)
            item = f"item-{r.randrange(self.items):04d}"
            out.append((t, "impression", {"user_id": user, "item_id": item, "position": pos}, 1))
            if r.random() < p * max(0.0, 1.0 - regime.fatigue * pos):
                tc = t + r.randint(*regime.click_ms)
                out.append((tc, "click", {"user_id": user, "item_id": item}, 1))
                if r.random() < self.buy_p[u]:
                    amount = round(r.lognormvariate(3.0, 0.8), 2)
                    purchase = {
                        "user_id": user,
                        "item_id": item,
                        "amount": amount,
                        "currency": "EUR",
                        "email": email_of(u),
                    }
                    out.append((tc + r.randint(*regime.purchase_ms), "purchase", purchase, 2))
        return out

    def sessions(
        self, n_events: int, start_ms: int, end_ms: int, regime: Regime
    ) -> list[dict[str, Any]]:
        """Sessions of random users starting uniformly in ``[start_ms, end_ms - 10 min)``
        until ``n_events`` events; in event-time order."""
        events: list[dict[str, Any]] = []
        while len(events) < n_events:
            u = self.rng.randrange(self.users)
            t = self.rng.randrange(start_ms, end_ms - 600_000)
            events.extend(self.event(*e) for e in self.session(u, t, regime))
        events = events[:n_events]
        events.sort(key=lambda e: e["event_time"])
        return events


@dataclass(frozen=True)
class Stream:
    events: list[dict[str, Any]]  # valid events, in event-time order
    bad: list[Any]  # deliberately invalid events, each with a different defect
    start_ms: int
    end_ms: int


def bad_events(events: list[dict[str, Any]], now_ms: int) -> list[Any]:
    """One invalid event per kind of defect, made from valid ones."""
    return [
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


def generate(
    n_events: int,
    now_ms: int,
    *,
    users: int = 2000,
    items: int = 500,
    span_s: int = 3 * 3600,
    seed: int = 7,
) -> Stream:
    """``n_events`` of normal traffic over ``span_s`` ending at ``now_ms``."""
    start = now_ms - span_s * 1000
    end = now_ms - 5_000
    events = Clickstream(users=users, items=items, seed=seed).sessions(
        n_events, start, end, CLASSIC
    )
    return Stream(events, bad_events(events, now_ms), start, end)


class Surge:
    """The flash sale, made on demand in event-time order: each hot user runs sessions back
    to back (a pause between them). Times are relative to the sale's start until
    :meth:`anchor` fixes where the sale sits on the clock."""

    def __init__(self, cs: Clickstream, hot: list[int], regime: Regime, seed: int) -> None:
        self._cs = cs
        self._regime = regime
        self._rng = random.Random(seed)
        cycle = (sum(regime.impressions) / 2) * (sum(regime.gap_ms) / 2) + sum(regime.pause_ms) / 2
        # hot users join the sale at random moments of their first cycle
        self._starts = [(self._rng.randrange(int(cycle)), u) for u in hot]
        heapq.heapify(self._starts)
        self._pending: list[tuple[int, int, str, dict[str, Any], int]] = []
        self._order = 0  # ties in time keep the order of drawing
        self.offset_ms = 0
        self.hot = hot

    def _fill(self) -> None:
        """Draw every session starting no later than the earliest pending event."""
        while self._starts and (not self._pending or self._starts[0][0] <= self._pending[0][0]):
            start, u = heapq.heappop(self._starts)
            drawn = self._cs.session(u, start, self._regime, self._rng)
            for t, type_, data, version in drawn:
                self._order += 1
                heapq.heappush(self._pending, (t, self._order, type_, data, version))
            last = max(t for t, *_ in drawn)
            heapq.heappush(self._starts, (last + self._rng.randint(*self._regime.pause_ms), u))

    def peek_ms(self) -> int:
        """The clock time of the next event."""
        self._fill()
        return self._pending[0][0] + self.offset_ms

    def take(self, n: int) -> list[dict[str, Any]]:
        """The next ``n`` events."""
        out = []
        for _ in range(n):
            self._fill()
            t, _, type_, data, version = heapq.heappop(self._pending)
            out.append(self._cs.event(t + self.offset_ms, type_, data, version))
        return out

    def until(self, t_ms: int) -> list[dict[str, Any]]:
        """Every next event before clock time ``t_ms``."""
        out = []
        while self.peek_ms() < t_ms:
            out.extend(self.take(1))
        return out

    def resume_at(self, t_ms: int) -> None:
        """Move what is still to come so that it starts no earlier than ``t_ms``: the time
        spent ingesting the sale's beginning is a pause in it."""
        gap = t_ms - self.peek_ms()
        if gap > 0:
            self.offset_ms += gap

    def anchor(self, events: list[dict[str, Any]], end_ms: int) -> None:
        """Place ``events`` (the first ones taken) and everything after on the clock so
        that the last of them is at ``end_ms``."""
        if not events:
            return
        shift = end_ms - events[-1]["event_time"]
        for e in events:
            e["event_time"] += shift
        self.offset_ms += shift


@dataclass
class DemoStream:
    """The demo's clickstream: ``history`` + ``replay`` are the first half (normal), the
    sale's first ``sale_events`` open the second; ``surge`` goes on live."""

    history: list[dict[str, Any]]  # ingested in bulk; the champion is trained on it
    replay: list[dict[str, Any]]  # the newest normal traffic, replayed with Predicts
    bad: list[Any]
    surge: Surge
    sale_events: int
    normal_start_ms: int
    normal_end_ms: int
    warm_ms: int  # impressions before this have 1h windows still filling (warm-up)


def demo_stream(
    n_events: int,
    now_ms: int,
    *,
    users: int = 2000,
    items: int = 500,
    span_s: int = 4 * 3600,
    replay_impressions: int = 0,
    seed: int = 7,
) -> DemoStream:
    """``n_events // 2`` of normal traffic over ``span_s``, ending early enough that the
    sale's first ``n_events - n_events // 2`` events, placed just before they are
    ingested, come after it; the newest ``replay_impressions`` impressions (and what
    follows them) are the replay (0: 900, or a fifteenth of the normal traffic's
    impressions if that is more; at most a third)."""
    cs = Clickstream(users=users, items=items, seed=seed)
    normal_n = n_events // 2
    sale_n = n_events - normal_n
    end = now_ms - int(sale_n / SURGE_EVENTS_PER_S * 1000) - 60_000
    start = end - span_s * 1000
    normal = cs.sessions(normal_n, start, end, NORMAL)
    impressions = [i for i, e in enumerate(normal) if e["type"] == "impression"]
    want = replay_impressions or max(900, len(impressions) // 15)
    keep = min(want, len(impressions) // 3)
    cut = impressions[-keep] if keep else len(normal)
    hot = sorted(random.Random(seed + 1).sample(range(users), max(1, int(users * HOT_SHARE))))
    surge = Surge(cs, hot, SALE, seed + 2)
    return DemoStream(
        history=normal[:cut],
        replay=normal[cut:],
        bad=bad_events(normal, now_ms),
        surge=surge,
        sale_events=sale_n,
        normal_start_ms=start,
        normal_end_ms=end,
        warm_ms=start + WARM_UP_S * 1000,
    )


def replay_rounds(
    events: list[dict[str, Any]],
) -> list[tuple[list[str], list[dict[str, Any]]]]:
    """The replay as rounds ``(users to score, events to send)``: round *r* scores each
    user's *r*-th impression, after everything before it of that user was sent, and sends
    that user's events up to their next impression. Users are independent (their features
    are their own), so one round serves all of them; a user's events keep their order."""
    per_user: dict[str, list[dict[str, Any]]] = {}
    for e in events:
        per_user.setdefault(e["data"]["user_id"], []).append(e)
    rounds: list[tuple[list[str], list[dict[str, Any]]]] = [([], [])]
    for user, evs in per_user.items():
        r = 0
        for e in evs:
            if e["type"] == "impression":
                r += 1
                while len(rounds) <= r:
                    rounds.append(([], []))
                rounds[r][0].append(user)
            rounds[r][1].append(e)
    return rounds
