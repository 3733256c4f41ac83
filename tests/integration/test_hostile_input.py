"""Hostile input at every ingest door: the HTTP batch endpoint, the NATS request endpoint,
the JetStream inbox and the Python SDK. Property-based (Hypothesis) over raw bytes, with
the real ingest service in process on a real nats-server.

What each door owes whatever it is given:

- HTTP: one of the documented statuses (200/207/400/413/415/422/429), never a 5xx, always a
  JSON body with a reason (``error`` and ``message``, or per-event ``statuses``/``results``);
- NATS: a typed reply, ``{ok: true, result}`` or ``{ok: false, error: {code, message}}``,
  never ``internal``;
- both: nothing applied beyond what the answer says: the events answered accepted are on
  EVENTS and nothing else is; each rejected one is in the DLQ with the reason and message
  it was answered with; a refused batch stores no event;
- inbox: the consumer is never wedged: a valid event published after hostile messages is
  stored within seconds, readiness holds, each hostile message is refused or rejected with
  its reason in the DLQ (or dead-lettered), nothing is retried forever;
- SDK: a value JSON cannot carry raises :class:`~myelin.sdk.UnencodableEvent` naming its
  path; nothing of that event is queued and what was queued is delivered whole.

Most strategies carry an oracle (:class:`Expect`): the exact verdict ingest owes each element
of a batch: invalid UTF-8 spliced into a string (lone surrogates ED A0 80..ED BF BF,
overlongs such as C0 80, stray continuation bytes, FF, truncated sequences) or valid
multibyte text spliced the same way, deep nesting, huge numbers, duplicate keys, NUL bytes
(escaped and raw), a byte order mark, oversized events and batches, non-objects, valid
events mixed with broken ones. Arbitrary bytes, and valid batches with random bytes
inserted anywhere, have no oracle: there the answer's own account is checked against the
streams.

Before the UTF-8 fixes (8f420ee) the invalid-UTF-8 cases fail at every door: HTTP answered
500, NATS ``internal``, and the inbox consumer retried the message forever (and, once the
consumer learned to dead-letter, could not sanitize it for the DLQ), so the event behind it
never arrived; the SDK raised UnicodeEncodeError from inside msgspec.

Three bugs these properties found have a test each at the end (they failed before the
fixes): data nested past half the recursion limit (sanitize crashed, and the inbox's
dead-letter sink then raised forever), an int beyond 64 bits in a contract registered at
run time (OverflowError: HTTP 500), and event ids that collided as per-event message ids
(nats-py strips header values).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass, replace
from typing import Any, Literal, Protocol, TypeVar

import aiohttp
import msgspec
import pytest
from hypothesis import HealthCheck, Phase, given
from hypothesis import settings as hyp_settings
from hypothesis import strategies as st
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from myelin import bus
from myelin.contracts import StreamEvent
from myelin.contracts.events import PurchaseV2
from myelin.contracts.schema import ContractSpec, FieldSpec
from myelin.contracts.store import ContractStore
from myelin.records import DeadLetter
from myelin.sdk import MAX_DEPTH, InvalidEvent, Producer, UnencodableEvent
from myelin.settings import Settings
from myelin.subjects import (
    DLQ_STREAM,
    EVENTS_STREAM,
    INGEST_STREAM,
    RPC_INGEST_PUBLISH,
    ingest_subject,
)
from services.ingest.app import IngestApp

pytestmark = pytest.mark.integration
T = TypeVar("T")

# Small limits, so that oversized events and batches are cheap to make.
MAX_EVENT_BYTES = 4096
MAX_BATCH_BYTES = 64 * 1024
MAX_BATCH_EVENTS = 40
# Nesting: up to SAFE_DEPTH every door rejects the event with a reason; from DEEP_DEPTH on
# the JSON parser gives up (at the recursion limit: 1000 in production, about 2000 while
# Hypothesis runs, 3000 under pytest) and the batch is refused as malformed. In between it
# depends on the recursion limit where the parser gives up; the depth the sanitizer could
# not walk is tested on its own:
# test_data_nested_past_half_the_recursion_limit_is_rejected_at_every_door.
SAFE_DEPTH = 400
DEEP_DEPTH = 5000

BATCH_REFUSALS = ("malformed_json", "not_a_batch", "batch_too_large", "too_many_events")
DOCUMENTED = {200, 207, 400, 413, 415, 422, 429}
REASONS = {
    "malformed_json",
    "not_a_batch",
    "batch_too_large",
    "too_many_events",
    "event_too_large",
    "invalid_envelope",
    "unknown_type",
    "unknown_version",
    "invalid_payload",
    "duplicate_in_batch",
    "clock_skew",
}
UTF8_MESSAGE = "not valid UTF-8"
BOM = b"\xef\xbb\xbf"

_ids = itertools.count()


def fresh(tag: str) -> str:
    """An event-id prefix no other example uses (the stream's duplicate window is long)."""
    return f"{tag}{next(_ids)}"


# ------------------------------------------------------------------ the oracle


@dataclass(frozen=True)
class Expect:
    """What ingest owes one element of a batch.

    ``verdict`` is ``a`` (accepted) or the rejection reason; ``ids`` the ids it may be
    stored under (accepted) or the one it is answered and dead-lettered under (rejected);
    ``utf8``: the rejection message says the string is not valid UTF-8; ``refuses``: the
    element makes the whole body malformed JSON (400, nothing applied)."""

    verdict: str
    ids: tuple[str, ...]
    utf8: bool = False
    refuses: bool = False


@dataclass(frozen=True)
class Piece:
    body: bytes
    expect: Expect


class Spec(Protocol):
    def render(self, eid: str, now: int) -> Piece: ...


Kind = Literal["click", "purchase", "impression"]
Pairs = list[tuple[bytes, bytes]]  # JSON-encoded (key, value) members, in order
TYPES: dict[str, tuple[str, int]] = {
    "click": ("click", 1),
    "purchase": ("purchase", 2),
    "impression": ("impression", 1),
}


def js(value: object) -> bytes:
    return msgspec.json.encode(value)


def obj(pairs: Pairs) -> bytes:
    return b"{" + b",".join(k + b":" + v for k, v in pairs) + b"}"


def envelope(kind: Kind, eid: str, now: int) -> tuple[Pairs, Pairs]:
    """A valid event of ``kind`` as (envelope members without data, data members)."""
    typ, version = TYPES[kind]
    env = [
        (b'"event_id"', js(eid)),
        (b'"type"', js(typ)),
        (b'"schema_version"', js(version)),
        (b'"event_time"', js(now)),
        (b'"producer_id"', js("hostile")),
        (b'"client_version"', js("fuzz/1")),
        (b'"trace_id"', js(f"trace-{eid}")),
    ]
    data = [(b'"user_id"', js(f"u-{eid}")), (b'"item_id"', js("i-1"))]
    if kind == "purchase":
        data += [(b'"amount"', js(12.5)), (b'"email"', js(f"buyer-{eid}@example.org"))]
    elif kind == "impression":
        data += [(b'"position"', js(3))]
    return env, data


def event(env: Pairs, data: Pairs | bytes) -> bytes:
    return obj([*env, (b'"data"', data if isinstance(data, bytes) else obj(data))])


def member(pairs: Pairs, key: str) -> int:
    return next(i for i, (k, _) in enumerate(pairs) if k == js(key))


def rejected(reason: str, eid: str, *, utf8: bool = False) -> Expect:
    return Expect(reason, (eid,), utf8=utf8)


def accepted(*ids: str) -> Expect:
    return Expect("a", ids)


@dataclass(frozen=True)
class Valid:
    kind: Kind

    def render(self, eid: str, now: int) -> Piece:
        return Piece(event(*envelope(self.kind, eid, now)), accepted(eid))


SPLICE_TARGETS: dict[str, tuple[str, ...]] = {
    "click": (
        "event_id",
        "type",
        "producer_id",
        "client_version",
        "trace_id",
        "data.user_id",
        "data.item_id",
        "key:producer_id",
        "key:data.item_id",
    ),
    "purchase": ("data.email", "data.user_id", "key:data.amount"),
    "impression": ("event_id", "data.item_id"),
}


@dataclass(frozen=True)
class Splice:
    """Bytes inserted into a string (a value, or a key with ``key:``) of a valid event."""

    kind: Kind
    target: str
    at: int
    insert: bytes

    def render(self, eid: str, now: int) -> Piece:
        env, data = envelope(self.kind, eid, now)
        in_data = self.target.removeprefix("key:").startswith("data.")
        name = self.target.removeprefix("key:").removeprefix("data.")
        pairs = data if in_data else env
        i = member(pairs, name)
        key, value = pairs[i]
        text = key if self.target.startswith("key:") else value
        at = 1 + min(self.at, len(text) - 2)
        bent = text[:at] + self.insert + text[at:]
        pairs[i] = (bent, value) if self.target.startswith("key:") else (key, bent)
        try:
            bent[1:-1].decode("utf-8")
        except UnicodeDecodeError:
            where = "invalid_payload" if in_data else "invalid_envelope"
            answered = bent[1:-1].decode("utf-8", "replace") if self.target == "event_id" else eid
            return Piece(event(env, data), rejected(where, answered, utf8=True))
        if self.target.startswith("key:"):  # valid UTF-8: an unknown field (closed contracts)
            where = "invalid_payload" if in_data else "invalid_envelope"
            return Piece(event(env, data), rejected(where, eid))
        if self.target == "type":  # no longer matches ^[a-z][a-z0-9_]{0,63}$
            return Piece(event(env, data), rejected("invalid_envelope", eid))
        stored = bent[1:-1].decode() if self.target == "event_id" else eid
        return Piece(event(env, data), accepted(stored))


@dataclass(frozen=True)
class Nul:
    """A NUL character: escaped (``\\u0000``, a valid string) or raw (malformed JSON)."""

    raw: bool
    between_tokens: bool = False

    def render(self, eid: str, now: int) -> Piece:
        env, data = envelope("click", eid, now)
        if not self.raw:
            data[0] = (b'"user_id"', js(f"u-{eid}\x00x"))
            return Piece(event(env, data), accepted(eid))
        if self.between_tokens:
            data[0] = (b'"user_id"', b"\x00" + js(f"u-{eid}"))
        else:
            data[0] = (b'"user_id"', js(f"u-{eid}")[:-1] + b'\x00"')
        return Piece(event(env, data), Expect("malformed_json", (), refuses=True))


HUGE_FIELDS: dict[str, tuple[Kind, str]] = {
    "event_time": ("click", "invalid_envelope"),
    "schema_version": ("click", "invalid_envelope"),
    "data.amount": ("purchase", "invalid_payload"),
    "data.position": ("impression", "invalid_payload"),
}
TINY = (b"1e-400", b"-0.0", b"0." + b"0" * 400 + b"1", b"0e999999")


@dataclass(frozen=True)
class Number:
    """A number JSON can write but no field can hold (or an amount that rounds to zero)."""

    target: str
    literal: bytes

    def render(self, eid: str, now: int) -> Piece:
        kind, reason = HUGE_FIELDS[self.target]
        env, data = envelope(kind, eid, now)
        in_data = self.target.startswith("data.")
        pairs = data if in_data else env
        i = member(pairs, self.target.removeprefix("data."))
        pairs[i] = (pairs[i][0], self.literal)
        if self.target == "data.amount" and self.literal in TINY:
            return Piece(event(env, data), accepted(eid))
        return Piece(event(env, data), rejected(reason, eid))


@dataclass(frozen=True)
class DuplicateKey:
    """A member given twice, both values valid: the event is accepted once, under either."""

    key: Literal["event_id", "data.user_id"]

    def render(self, eid: str, now: int) -> Piece:
        env, data = envelope("click", eid, now)
        if self.key == "event_id":
            env.append((b'"event_id"', js(f"{eid}-b")))
            return Piece(event(env, data), accepted(eid, f"{eid}-b"))
        data.append((b'"user_id"', js(f"u-{eid}-b")))
        return Piece(event(env, data), accepted(eid))


@dataclass(frozen=True)
class Nested:
    """Arrays or objects nested ``depth`` deep: as ``data``, as an unknown envelope member,
    or as the batch element itself."""

    where: Literal["data", "member", "element"]
    opener: Literal["[", "{"]
    depth: int

    def nest(self) -> bytes:
        if self.opener == "[":
            return b"[" * self.depth + b"]" * self.depth
        return b'{"a":' * self.depth + b"1" + b"}" * self.depth

    def render(self, eid: str, now: int) -> Piece:
        env, data = envelope("click", eid, now)
        if self.where == "element":
            body, answered, reason = self.nest(), "", "invalid_envelope"
        elif self.where == "member":
            body, answered, reason = (
                event([*env, (b'"x"', self.nest())], data),
                eid,
                "invalid_envelope",
            )
        else:
            body, answered, reason = event(env, self.nest()), eid, "invalid_payload"
        if self.depth >= DEEP_DEPTH:
            return Piece(body, Expect("malformed_json", (), refuses=True))
        if len(body) > MAX_EVENT_BYTES:
            return Piece(body, rejected("event_too_large", answered))
        return Piece(body, rejected(reason, answered))


@dataclass(frozen=True)
class TooLarge:
    def render(self, eid: str, now: int) -> Piece:
        env, data = envelope("click", eid, now)
        data[0] = (b'"user_id"', js("u" * MAX_EVENT_BYTES))
        return Piece(event(env, data), rejected("event_too_large", eid))


@dataclass(frozen=True)
class NotAnObject:
    literal: bytes

    def render(self, eid: str, now: int) -> Piece:
        return Piece(self.literal, rejected("invalid_envelope", ""))


@dataclass(frozen=True)
class Batch:
    """Elements in a JSON array (or one object sent bare), maybe after a byte order mark,
    maybe padded with whitespace past the batch size limit."""

    specs: tuple[Spec, ...]
    bom: bool = False
    bare: bool = False
    pad: int = 0

    def render(self, tag: str) -> tuple[list[Piece], bytes, bool]:
        """The pieces, the body, and whether the body is one object rather than an array."""
        prefix, now = fresh(tag), int(time.time() * 1000)
        pieces = [s.render(f"{prefix}-{i}", now) for i, s in enumerate(self.specs)]
        bare = self.bare and len(pieces) == 1 and pieces[0].body.startswith(b"{")
        inner = pieces[0].body if bare else b"[" + b",".join(p.body for p in pieces) + b"]"
        body = (BOM if self.bom else b"") + (b" " * self.pad if self.pad else b"") + inner
        return pieces, body, bare


def refusal(batch: Batch, pieces: list[Piece], body: bytes, bare: bool) -> str | None:
    """The reason the whole batch is refused for (in parse order), or None."""
    if len(body) > MAX_BATCH_BYTES:
        return "batch_too_large"
    if batch.bom:
        return "malformed_json"
    if bare:  # the parser stops at the first byte: not an array
        return "not_a_batch"
    if any(p.expect.refuses for p in pieces):
        return "malformed_json"
    if len(pieces) > MAX_BATCH_EVENTS:
        return "too_many_events"
    return None


# ------------------------------------------------------------------ strategies

lone_surrogates = st.integers(0xD800, 0xDFFF).map(
    lambda cp: chr(cp).encode("utf-8", "surrogatepass")
)
overlongs = st.sampled_from(
    [b"\xc0\x80", b"\xc0\xaf", b"\xc1\xbf", b"\xe0\x80\x80", b"\xe0\x9f\xbf", b"\xf0\x80\x80\x80"]
)
continuations = st.integers(0x80, 0xBF).map(lambda b: bytes([b]))
never_utf8 = st.sampled_from([b"\xff", b"\xfe", b"\xf4\x90\x80\x80", b"\xf8\x88\x80\x80\x80"])
truncated = st.sampled_from(["é", "€", "中", "😀"]).flatmap(
    lambda c: st.integers(1, len(c.encode()) - 1).map(lambda n: c.encode()[:n])
)
high_bytes = st.binary(min_size=1, max_size=6).map(lambda b: bytes(x | 0x80 for x in b))
multibyte = st.text(
    st.characters(min_codepoint=0x80, exclude_categories=["Cs"]), min_size=1, max_size=3
).map(str.encode)
insertions = st.lists(
    st.one_of(
        lone_surrogates, overlongs, continuations, never_utf8, truncated, high_bytes, multibyte
    ),
    min_size=1,
    max_size=3,
).map(b"".join)

kinds: st.SearchStrategy[Kind] = st.sampled_from(["click", "purchase", "impression"])
splices = kinds.flatmap(
    lambda k: st.builds(
        Splice, st.just(k), st.sampled_from(SPLICE_TARGETS[k]), st.integers(0, 40), insertions
    )
)
huge_literals = st.one_of(
    st.integers(10**20, 10**400).map(lambda n: str(n).encode()),
    st.integers(-(10**400), -(10**20)).map(lambda n: str(n).encode()),
    st.sampled_from([b"1e400", b"-1e400", b"1e309", b"123456789e300", b"1" + b"0" * 400]),
)
numbers = st.builds(
    Number,
    st.sampled_from(sorted(HUGE_FIELDS)),
    st.one_of(huge_literals, st.sampled_from(TINY)),
)
depths = st.one_of(
    st.integers(1, 40), st.integers(41, SAFE_DEPTH), st.integers(DEEP_DEPTH, DEEP_DEPTH + 3000)
)
nested = st.builds(
    Nested,
    st.sampled_from(["data", "member", "element"]),
    st.sampled_from(["[", "{"]),
    depths,
)
not_objects = st.builds(
    NotAnObject, st.sampled_from([b"0", b"null", b'"x"', b"[]", b"true", b"{}", b"-1e400"])
)
specs: st.SearchStrategy[Spec] = st.one_of(
    st.builds(Valid, kinds),
    splices,
    splices,
    splices,
    st.builds(Nul, st.booleans(), st.booleans()),
    numbers,
    st.builds(DuplicateKey, st.sampled_from(["event_id", "data.user_id"])),
    nested,
    st.just(TooLarge()),
    not_objects,
)
batches = st.one_of(
    st.builds(Batch, st.lists(specs, max_size=8).map(tuple)),
    st.builds(Batch, st.lists(specs, min_size=1, max_size=8).map(tuple)),
    st.builds(Batch, st.lists(specs, min_size=1, max_size=3).map(tuple), bom=st.just(True)),
    st.builds(Batch, st.tuples(specs), bare=st.just(True)),
    st.integers(MAX_BATCH_EVENTS + 1, MAX_BATCH_EVENTS + 4).map(
        lambda n: Batch((Valid("click"),) * n)
    ),
    st.builds(Batch, st.tuples(st.builds(Valid, kinds)), pad=st.just(MAX_BATCH_BYTES)),
)


@dataclass(frozen=True)
class Mangled:
    """A valid batch with random bytes inserted anywhere (no oracle)."""

    size: int
    edits: tuple[tuple[float, bytes], ...]

    def render(self) -> bytes:
        _, body, _ = Batch((Valid("click"),) * self.size).render("m")
        for frac, insert in self.edits:
            at = int(frac * len(body))
            body = body[:at] + insert + body[at:]
        return body


raw_bodies: st.SearchStrategy[bytes | Mangled] = st.one_of(
    st.binary(max_size=300),
    st.builds(
        Mangled,
        st.integers(1, 4),
        st.lists(
            st.tuples(st.floats(0, 1), st.binary(min_size=1, max_size=4)), min_size=1, max_size=3
        ).map(tuple),
    ),
)


def body_of(raw: bytes | Mangled) -> bytes:
    return raw.render() if isinstance(raw, Mangled) else raw


# ------------------------------------------------------------------ harness


def explore(
    strategy: st.SearchStrategy[T],
    check: Callable[[T], Coroutine[Any, Any, None]],
    examples: int,
    after_failure: Callable[[], Coroutine[Any, Any, None]] | None = None,
    *,
    shrink: bool = True,
) -> Awaitable[None]:
    """Run ``check`` on the test's event loop for each example Hypothesis draws (Hypothesis
    itself runs in a worker thread). ``after_failure`` tidies up after a failed example, so
    that the next one (Hypothesis shrinks by running many) is judged on its own; without
    ``shrink`` the first failing example is reported as it is (for a failure that outlives
    its example, like a wedged consumer)."""
    loop = asyncio.get_running_loop()
    phases = [Phase.explicit, Phase.reuse, Phase.generate] + ([Phase.shrink] if shrink else [])

    @hyp_settings(
        max_examples=examples,
        deadline=None,
        phases=phases,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(strategy)
    def probe(case: T) -> None:
        try:
            asyncio.run_coroutine_threadsafe(check(case), loop).result(timeout=60)
        except BaseException:
            if after_failure is not None:
                asyncio.run_coroutine_threadsafe(after_failure(), loop).result(timeout=60)
            raise

    return asyncio.to_thread(probe)


class Streams:
    """What ingest stored since the last look, read message by message (direct get)."""

    def __init__(self, js_ctx: JetStreamContext) -> None:
        self.js = js_ctx
        self.last = {EVENTS_STREAM: 0, DLQ_STREAM: 0}
        self.letters: set[tuple[str, str, str]] = set()  # every (reason, event id, message)

    async def _new(self, stream: str) -> list[bytes]:
        last = (await self.js.stream_info(stream)).state.last_seq
        out = []
        for seq in range(self.last[stream] + 1, last + 1):
            out.append((await self.js.get_msg(stream, seq)).data or b"")
        self.last[stream] = last
        return out

    async def skip(self) -> None:
        """Look past whatever a failed example left behind."""
        await self.events()
        await self.dead_letters()

    async def events(self) -> list[StreamEvent]:
        return [
            e
            for data in await self._new(EVENTS_STREAM)
            for e in msgspec.msgpack.decode(data, type=list[StreamEvent])
        ]

    async def dead_letters(self) -> list[DeadLetter]:
        new = [msgspec.msgpack.decode(d, type=DeadLetter) for d in await self._new(DLQ_STREAM)]
        self.letters |= {(d.reason, d.event_id, d.message) for d in new}
        return new


def check_stored(events: list[StreamEvent], pieces: list[Piece]) -> None:
    """The stored events are exactly the pieces expected accepted, once each; no raw PII."""
    want = [p.expect.ids for p in pieces if p.expect.verdict == "a"]
    got = sorted(e.event_id for e in events)
    assert len(got) == len(want), (got, want)
    for ids in want:
        [match] = [g for g in ids if g in got]
        got.remove(match)
    for e in events:
        if e.type == "purchase":
            email = msgspec.msgpack.decode(e.data, type=PurchaseV2).email
            assert email.startswith("pii:"), email


def check_letters_clean(letters: list[DeadLetter]) -> None:
    for d in letters:
        assert d.reason in REASONS, d
        assert d.message and d.payload, d
        assert "@example.org" not in d.payload, d  # PII tokenized or the payload redacted


def check_verdicts(answer: dict[str, Any], pieces: list[Piece]) -> None:
    """The per-event account: one letter per event in order, a result for each reject."""
    results = {r["index"]: r for r in answer["results"]}
    want = "".join("a" if p.expect.verdict == "a" else "r" for p in pieces)
    assert answer["statuses"] == want, (answer, [p.expect for p in pieces])
    assert set(results) == {i for i, c in enumerate(want) if c == "r"}
    for i, r in results.items():
        e = pieces[i].expect
        assert (r["status"], r["reason"], r["event_id"]) == ("rejected", e.verdict, e.ids[0]), (
            r,
            e,
        )
        assert (UTF8_MESSAGE in r["message"]) == e.utf8, (r, e)
    assert (answer["accepted"], answer["rejected"]) == (want.count("a"), want.count("r"))
    assert (answer["duplicates"], answer["retry"]) == (0, 0)


async def check_applied(
    streams: Streams,
    answer: dict[str, Any] | None,
    refused: tuple[str, str] | None,
    *,
    http: bool = False,
) -> list[StreamEvent]:
    """Nothing applied beyond the answer: a refused batch stores no event and is itself in
    the DLQ with its reason and message (but for a body HTTP would not even read: over the
    size limit); otherwise each reject is in the DLQ as answered, and nothing else is."""
    events, letters = await streams.events(), await streams.dead_letters()
    check_letters_clean(letters)
    if refused is not None:
        assert events == []
        assert all((d.reason, d.message) == refused for d in letters), letters
        if not (http and refused[0] == "batch_too_large"):
            # (reason only: a refused batch's letter is deduplicated by its guessed event id,
            # or the digest of its first max_event_bytes, so an earlier one may stand for it)
            assert any(r == refused[0] for (r, _, _) in streams.letters), (refused, letters)
        return events
    assert answer is not None
    assert len(events) == answer["accepted"]
    answered = {
        (r["reason"], r["event_id"], r["message"])
        for r in answer["results"]
        if r["status"] == "rejected"
    }
    assert {(d.reason, d.event_id, d.message) for d in letters} <= answered
    assert answered <= streams.letters  # (an identical earlier letter deduplicates this one)
    return events


# ------------------------------------------------------------------ fixtures


@pytest.fixture
def hostile_settings(settings: Settings) -> Settings:
    return replace(
        settings,
        max_event_bytes=MAX_EVENT_BYTES,
        max_batch_bytes=MAX_BATCH_BYTES,
        max_batch_events=MAX_BATCH_EVENTS,
    )


@pytest.fixture
async def ingest(nc: NATS, hostile_settings: Settings) -> AsyncIterator[IngestApp]:
    app = IngestApp(hostile_settings)
    await app.start()
    try:
        yield app
    finally:
        await app.stop()


def url_of(s: Settings) -> str:
    return f"http://127.0.0.1:{s.ingest_http_port}/v1/events"


async def post(
    http: aiohttp.ClientSession, url: str, body: bytes, ctype: str = "application/json"
) -> tuple[int, dict[str, Any], dict[str, str]]:
    async with http.post(url, data=body, headers={"Content-Type": ctype}) as r:
        raw = await r.read()
        assert r.content_type == "application/json", (r.status, raw[:200])
        return r.status, json.loads(raw), dict(r.headers)


def check_http_shape(status: int, payload: dict[str, Any], headers: dict[str, str]) -> None:
    """A documented status with a reason in the body, whatever the input."""
    assert status in DOCUMENTED, (status, payload)
    if status in (400, 413, 415):
        assert payload["error"] in (*BATCH_REFUSALS, "unsupported_media_type"), payload
        assert payload["message"], payload
    else:
        counts = sum(payload[k] for k in ("accepted", "duplicates", "rejected", "retry"))
        assert len(payload["statuses"]) == counts, payload
        assert len(payload["results"]) == counts - payload["accepted"], payload
        assert all(r["reason"] for r in payload["results"] if r["status"] == "rejected")
    if status == 429:
        assert int(headers["Retry-After"]) >= 1


# ------------------------------------------------------------------ HTTP


@dataclass(frozen=True)
class HttpCase:
    batch: Batch
    ctype: str
    per_event: bool


ALLOWED_TYPES = ("application/json", "application/json; charset=utf-8", "application/octet-stream")
CTYPES = st.one_of(
    st.sampled_from(ALLOWED_TYPES), st.sampled_from(["text/plain", "application/xml"])
)


async def test_http_answers_every_body_with_a_documented_status_and_applies_only_that(
    ingest: IngestApp, nc: NATS, hostile_settings: Settings
) -> None:
    """Each generated batch gets exactly the status and per-event verdicts its oracle says
    (invalid UTF-8 in a string: the event is rejected ``invalid_envelope`` /
    ``invalid_payload`` naming UTF-8), and the streams hold exactly what was answered."""
    streams, url = Streams(bus.jetstream(nc, hostile_settings)), url_of(hostile_settings)
    seen: Counter[int] = Counter()

    async with aiohttp.ClientSession() as http:

        async def check(case: HttpCase) -> None:
            pieces, body, bare = case.batch.render("h")
            q = "?mode=per_event" if case.per_event else ""
            status, payload, headers = await post(http, url + q, body, case.ctype)
            seen[status] += 1
            check_http_shape(status, payload, headers)
            if case.ctype not in ALLOWED_TYPES:
                assert (status, payload["error"]) == (415, "unsupported_media_type")
                assert await streams.events() == [] and await streams.dead_letters() == []
                return
            why = refusal(case.batch, pieces, body, bare)
            if why is not None:
                code = 400 if why in ("malformed_json", "not_a_batch") else 413
                assert (status, payload.get("error")) == (code, why), payload
                await check_applied(streams, None, (why, payload["message"]), http=True)
                return
            verdicts = "".join("a" if p.expect.verdict == "a" else "r" for p in pieces)
            assert status == (
                422 if verdicts and "a" not in verdicts else 207 if "r" in verdicts else 200
            )
            check_verdicts(payload, pieces)
            check_stored(await check_applied(streams, payload, None, http=True), pieces)

        await explore(st.builds(HttpCase, batches, CTYPES, st.booleans()), check, 250, streams.skip)
    assert {200, 207, 400, 413, 415, 422} <= set(seen), seen


async def test_http_survives_arbitrary_bytes(
    ingest: IngestApp, nc: NATS, hostile_settings: Settings
) -> None:
    """Arbitrary bytes, and valid batches with random bytes inserted anywhere: a documented
    status with a reason, never a 5xx, and the streams hold exactly what was answered."""
    streams, url = Streams(bus.jetstream(nc, hostile_settings)), url_of(hostile_settings)
    async with aiohttp.ClientSession() as http:

        async def check(raw: bytes | Mangled) -> None:
            status, payload, headers = await post(http, url, body_of(raw))
            check_http_shape(status, payload, headers)
            refused = (payload["error"], payload["message"]) if "error" in payload else None
            await check_applied(streams, None if refused else payload, refused, http=True)

        await explore(raw_bodies, check, 150, streams.skip)
        status, payload, _ = await post(http, url, Batch((Valid("click"),) * 2).render("x")[1])
        assert (status, payload["accepted"]) == (200, 2)  # still serving


# ------------------------------------------------------------------ NATS request-reply


class WireError(msgspec.Struct, forbid_unknown_fields=True):
    code: str
    message: str
    details: dict[str, Any] = {}


class WireReply(msgspec.Struct, forbid_unknown_fields=True):
    """The reply contract, closed: anything else in a reply fails the decode. ``result``
    is empty when the reply has none."""

    ok: bool
    result: msgspec.Raw = msgspec.Raw(b"")
    error: WireError | None = None


async def nats_ask(nc: NATS, body: bytes, per_event: bool = False) -> WireReply:
    headers = {"Myelin-Mode": "per_event"} if per_event else None
    msg = await nc.request(
        bus.caller_subject(nc, RPC_INGEST_PUBLISH), body, timeout=10, headers=headers
    )
    reply = msgspec.json.decode(msg.data, type=WireReply)
    if reply.ok:
        assert reply.error is None and len(reply.result), reply
    else:
        assert not len(reply.result) and reply.error is not None, reply
        assert reply.error.code != "internal", reply.error
        assert reply.error.code in (*BATCH_REFUSALS, "overloaded"), reply.error
        assert reply.error.message, reply.error
    return reply


@dataclass(frozen=True)
class NatsCase:
    batch: Batch
    per_event: bool


async def test_nats_replies_are_typed_and_apply_only_what_they_say(
    ingest: IngestApp, nc: NATS, hostile_settings: Settings
) -> None:
    """Every reply decodes as ``{ok, result | error{code, message}}`` and matches the
    oracle: the refusal code, or the per-event verdicts (invalid UTF-8 rejected, naming it;
    never ``internal``); the streams hold exactly what was answered."""
    streams = Streams(bus.jetstream(nc, hostile_settings))
    codes: Counter[str] = Counter()

    async def check(case: NatsCase) -> None:
        pieces, body, bare = case.batch.render("n")
        reply = await nats_ask(nc, body, case.per_event)
        why = refusal(case.batch, pieces, body, bare)
        if why is not None:
            assert reply.error is not None and reply.error.code == why, reply
            codes[why] += 1
            await check_applied(streams, None, (why, reply.error.message))
            return
        answer = msgspec.json.decode(reply.result)
        codes["ok"] += 1
        check_verdicts(answer, pieces)
        check_stored(await check_applied(streams, answer, None), pieces)

    await explore(st.builds(NatsCase, batches, st.booleans()), check, 200, streams.skip)
    assert {"ok", "malformed_json", "not_a_batch"} <= set(codes), codes


async def test_nats_survives_arbitrary_bytes(
    ingest: IngestApp, nc: NATS, hostile_settings: Settings
) -> None:
    """Arbitrary bytes over NATS: always a typed reply, never ``internal``, and the streams
    hold exactly what was answered."""
    streams = Streams(bus.jetstream(nc, hostile_settings))

    async def check(raw: bytes | Mangled) -> None:
        reply = await nats_ask(nc, body_of(raw))
        if reply.error is not None:
            await check_applied(streams, None, (reply.error.code, reply.error.message))
        else:
            await check_applied(streams, msgspec.json.decode(reply.result), None)

    await explore(raw_bodies, check, 100, streams.skip)


# ------------------------------------------------------------------ JetStream inbox


@dataclass(frozen=True)
class InboxCase:
    messages: tuple[Batch | bytes | Mangled, ...]


async def wait_for(check: Callable[[], Awaitable[bool]], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not await check():
        assert time.monotonic() < deadline, f"{what}: not within {timeout_s}s"
        await asyncio.sleep(0.02)


async def test_inbox_is_never_wedged_by_hostile_messages(
    ingest: IngestApp, nc: NATS, hostile_settings: Settings
) -> None:
    """Hostile messages on ``myelin.ingest.<producer>`` followed by one valid event: the
    valid event is on EVENTS within 5 s, the service stays ready with its inbox ``ok``,
    every message is acked or terminated, each oracle event got its verdict (accepted on
    EVENTS, or in the DLQ with its reason, naming UTF-8 where it should), each refused
    message is dead-lettered with its reason, and nothing is retried forever."""
    js_ctx = bus.jetstream(nc, hostile_settings)
    streams = Streams(js_ctx)
    totals: Counter[str] = Counter()

    def counters() -> Counter[str]:
        s = ingest.status()
        return Counter(
            accepted=s["accepted"],
            rejected=s["rejected"],
            refused=s["refused_batches"],
            dead=s["inbox"]["dead_lettered"],
        )

    async def check(case: InboxCase) -> None:
        before = counters()
        expect_stored: list[Piece] = []
        expect_rejected: list[Expect] = []
        expect_refused: list[str] = []
        oracle_ids: set[str] = set()
        arbitrary = mangled_events = 0
        for m in case.messages:
            if isinstance(m, Batch):
                pieces, body, _ = m.render("i")
                oracle_ids.update(i for p in pieces for i in p.expect.ids)
                why = refusal(m, pieces, body.strip(), bare=False)  # a bare object is wrapped
                if why is not None:
                    expect_refused.append(why)
                else:
                    expect_stored += [p for p in pieces if p.expect.verdict == "a"]
                    expect_rejected += [p.expect for p in pieces if p.expect.verdict != "a"]
            else:
                body = body_of(m)
                arbitrary += body.strip() not in (b"[]", b"")  # [] is an empty batch
                mangled_events += m.size if isinstance(m, Mangled) else 0
            await js_ctx.publish(ingest_subject("hostile"), body)
        sentinel = Valid("click").render(fresh("sentinel"), int(time.time() * 1000))
        await js_ctx.publish(ingest_subject("hostile"), sentinel.body)
        events: list[StreamEvent] = []

        async def sentinel_stored() -> bool:
            events.extend(await streams.events())
            return any(e.event_id == sentinel.expect.ids[0] for e in events)

        await wait_for(sentinel_stored, 5.0, "the valid event behind the hostile ones")
        status = ingest.status()
        assert status["ready"] is True and status["not_ready"] == [], status
        assert (status["inbox"]["state"], status["inbox"]["attempts"]) == ("ok", 0), status

        async def all_acked() -> bool:
            info = await js_ctx.consumer_info(INGEST_STREAM, "ingest-inbox")
            return bool(info.num_pending == 0 and info.num_ack_pending == 0)

        await wait_for(all_acked, 5.0, "every inbox message acked or terminated")
        expected_ids = {i for p in expect_stored for i in p.expect.ids}
        # a mangled batch may still be valid JSON: its events may be stored
        extra = [e for e in events if e.event_id not in expected_ids | set(sentinel.expect.ids)]
        assert not {e.event_id for e in extra} & oracle_ids, extra
        assert len(extra) <= mangled_events, extra
        check_stored([e for e in events if e.event_id in expected_ids], expect_stored)
        letters = await streams.dead_letters()
        check_letters_clean(letters)
        for e in expect_rejected:
            found = [m for (r, i, m) in streams.letters if (r, i) == (e.verdict, e.ids[0])]
            assert found, (e, letters)
            assert any((UTF8_MESSAGE in m) == e.utf8 for m in found), (e, found)
        for why in expect_refused:
            assert any(r == why for (r, _, _) in streams.letters), (why, letters)
        delta = counters() - before
        assert delta["accepted"] == len(expect_stored) + len(extra) + 1, delta
        assert delta["refused"] >= len(expect_refused), delta
        assert delta["rejected"] >= len(expect_rejected), delta
        verdicts = delta["refused"] + delta["rejected"] + delta["dead"] + len(extra)
        assert verdicts >= len(expect_refused) + len(expect_rejected) + arbitrary, delta
        totals.update(delta)

    messages = st.lists(st.one_of(batches, batches, raw_bodies), min_size=1, max_size=3)
    # A wedged consumer stays wedged: later examples cannot be judged, so no shrinking.
    await explore(
        messages.map(lambda ms: InboxCase(tuple(ms))), check, 60, streams.skip, shrink=False
    )
    failures = ingest.status()["inbox"]["failures"]
    await asyncio.sleep(1.5)
    assert ingest.status()["inbox"]["failures"] == failures  # nothing is being retried
    assert totals["refused"] and totals["rejected"] and totals["accepted"], totals


# ------------------------------------------------------------------ SDK


@dataclass(frozen=True)
class SdkCase:
    """One hostile ``Producer.send`` call and the error it must raise."""

    type_: str
    version: int
    data: dict[Any, Any]
    path: str  # where the message says the problem is
    event_id: str | None = None
    trace_id: str = ""


def deep(depth: int) -> dict[str, Any]:
    d: dict[str, Any] = {}
    for _ in range(depth):
        d = {"a": d}
    return d


surrogate_chars = st.integers(0xD800, 0xDFFF).map(chr)
click_fields = st.sampled_from(["user_id", "item_id"])
sdk_cases = st.one_of(
    st.builds(
        lambda f, c: SdkCase(
            "click", 1, {"user_id": "u", "item_id": "i", f: f"x{c}y"}, f"$.data.{f}"
        ),
        click_fields,
        surrogate_chars,
    ),
    st.builds(
        lambda c: SdkCase("click", 1, {"user_id": "u", "item_id": "i", f"k{c}": 1}, "$.data['k"),
        surrogate_chars,
    ),
    st.builds(
        lambda k: SdkCase("click", 1, {"user_id": "u", "item_id": "i", k: "x"}, "$.data"),
        st.one_of(st.integers(), st.floats(allow_nan=False), st.none(), st.tuples(st.integers())),
    ),
    st.builds(
        lambda f, b: SdkCase("click", 1, {"user_id": "u", "item_id": "i", f: b}, f"$.data.{f}"),
        click_fields,
        st.binary(max_size=4),
    ),
    st.builds(
        lambda x: SdkCase(
            "purchase", 1, {"user_id": "u", "item_id": "i", "amount": x}, "$.data.amount"
        ),
        st.sampled_from([math.nan, math.inf, -math.inf]),
    ),
    st.builds(
        lambda n: SdkCase(
            "impression", 1, {"user_id": "u", "item_id": "i", "position": n}, "$.data.position"
        ),
        st.integers(2**64, 2**600) | st.integers(-(2**600), -(2**63) - 1),
    ),
    st.builds(
        lambda n: SdkCase("click", 1, {"user_id": "u", "item_id": "i", "x": deep(n)}, "$.data.x"),
        st.integers(MAX_DEPTH, 3000),
    ),
    st.builds(
        lambda c: SdkCase("click", 1, {"user_id": "u", "item_id": "i"}, "$.event_id", f"e{c}"),
        surrogate_chars,
    ),
    st.builds(
        lambda c: SdkCase(
            "click", 1, {"user_id": "u", "item_id": "i"}, "$.trace_id", trace_id=f"t{c}"
        ),
        surrogate_chars,
    ),
    st.just(SdkCase("click", 1, {"user_id": object(), "item_id": "i"}, "$.data.user_id")),
)


async def test_sdk_refuses_what_json_cannot_carry_and_sends_the_rest_whole(
    ingest: IngestApp, nc: NATS, hostile_settings: Settings
) -> None:
    """``Producer.send`` with a value JSON cannot carry (lone surrogates in values, keys and
    ids, non-string keys, bytes, NaN/inf, ints beyond 64 bits, deep nesting, an unknown type)
    raises UnencodableEvent (an InvalidEvent) whose message starts with the field's path,
    with and without local validation. Before the fix it raised UnicodeEncodeError,
    RecursionError or TypeError from inside msgspec, or sent NaN as null and bytes as
    base64. The valid events sent between them are all stored, once, and nothing else is."""
    sent: list[str] = []
    async with (
        Producer(hostile_settings.nats_url, producer_id="hostile", batch_size=7) as checked,
        Producer(
            hostile_settings.nats_url, producer_id="hostile", batch_size=5, validate=False
        ) as unchecked,
    ):

        async def check(case: SdkCase) -> None:
            for p in (checked, unchecked):
                with pytest.raises(InvalidEvent) as err:
                    await p.send(
                        case.type_,
                        case.version,
                        case.data,
                        event_id=case.event_id,
                        trace_id=case.trace_id,
                    )
                assert isinstance(err.value, UnencodableEvent), err.value
                assert err.value.code == "unencodable_event"
                assert str(err.value.details["path"]).startswith(case.path), err.value
                assert str(err.value).startswith(case.path), err.value
                str(err.value).encode()  # the message itself is printable UTF-8
                eid = fresh("sdk")
                sent.append(
                    await p.send("click", 1, {"user_id": eid, "item_id": "i"}, event_id=eid)
                )

        await explore(sdk_cases, check, 100)
    assert (checked.rejected, unchecked.rejected) == ([], [])
    # a batch whose reply was lost (a request timeout on a loaded machine) is sent again and
    # its events come back as duplicates of the stored ones: accepted or duplicate, once each
    answered = checked.accepted + checked.duplicates + unchecked.accepted + unchecked.duplicates
    assert answered == len(sent)
    stored = [e.event_id for e in await Streams(bus.jetstream(nc, hostile_settings)).events()]
    assert sorted(stored) == sorted(sent)


# ------------------------------------------------------------------ known bugs


async def _three_doors(
    nc: NATS, settings: Settings, app: IngestApp, body: bytes, reason: str, eid: str
) -> None:
    """``body`` (one event) is rejected with ``reason`` over HTTP and NATS, and on the inbox
    it is rejected too and the event behind it flows."""
    async with aiohttp.ClientSession() as http:
        status, payload, _ = await post(http, url_of(settings), b"[" + body + b"]")
    assert (status, payload["results"][0]["reason"]) == (422, reason), payload
    reply = await nats_ask(nc, b"[" + body + b"]")
    assert b'"statuses":"r"' in bytes(reply.result), reply
    js_ctx = bus.jetstream(nc, settings)
    await js_ctx.publish(ingest_subject("p"), body)
    after = Valid("click").render(f"{eid}-after", int(time.time() * 1000))
    await js_ctx.publish(ingest_subject("p"), after.body)
    streams = Streams(js_ctx)

    async def flowed() -> bool:
        return any(e.event_id == f"{eid}-after" for e in await streams.events())

    await wait_for(flowed, 5.0, "the event behind it")
    assert app.status()["inbox"]["dead_lettered"] == 0


async def test_data_nested_past_half_the_recursion_limit_is_rejected_at_every_door(
    ingest: IngestApp, nc: NATS, hostile_settings: Settings
) -> None:
    """Data nested 0.6 x the recursion limit deep (600 in production) is parseable JSON:
    it must be rejected ``invalid_payload`` at every door, and the inbox must flow on."""
    env, _ = envelope("click", "deep-1", int(time.time() * 1000))
    body = event(env, Nested("data", "[", int(sys.getrecursionlimit() * 0.6)).nest())
    await _three_doors(nc, hostile_settings, ingest, body, "invalid_payload", "deep-1")


async def test_an_int_beyond_64_bits_in_a_runtime_contract_is_rejected(
    nc: NATS, hostile_settings: Settings
) -> None:
    """A contract registered at run time with an unbounded ``int`` field: 2**64 in it must
    be rejected ``invalid_payload`` at every door, not crash the request."""
    spec = ContractSpec(
        type="tally",
        version=1,
        key_field="user_id",
        fields=[FieldSpec(name="user_id", type="string"), FieldSpec(name="n", type="int")],
        compatibility="NONE",
    )
    await ContractStore(bus.jetstream(nc, hostile_settings)).register(spec)
    app = IngestApp(hostile_settings)
    await app.start()
    try:
        body = (
            b'{"event_id":"tally-1","type":"tally","schema_version":1,"event_time":'
            + str(int(time.time() * 1000)).encode()
            + b',"data":{"user_id":"u","n":18446744073709551616}}'
        )
        await _three_doors(nc, hostile_settings, app, body, "invalid_payload", "tally-1")
    finally:
        await app.stop()


async def test_distinct_event_ids_are_stored_distinctly_in_per_event_mode(
    ingest: IngestApp, nc: NATS, hostile_settings: Settings
) -> None:
    """Event ids that differ only by surrounding whitespace or CR/LF are different ids:
    each is accepted and stored."""
    now = int(time.time() * 1000)
    answers = []
    async with aiohttp.ClientSession() as http:
        for eid in ("ws-1", " ws-1", "cr\r\nlf", "cr  lf"):
            body = event(envelope("click", eid, now)[0], envelope("click", "x", now)[1])
            _, payload, _ = await post(
                http, url_of(hostile_settings) + "?mode=per_event", b"[" + body + b"]"
            )
            answers.append(payload["statuses"])
    assert answers == ["a", "a", "a", "a"]
    stored = await Streams(bus.jetstream(nc, hostile_settings)).events()
    assert sorted(e.event_id for e in stored) == sorted([" ws-1", "cr  lf", "cr\r\nlf", "ws-1"])
