"""Pure windowing logic: per-entity bucketed state and event-time windows.

State per entity: ``watermark`` (newest event time seen, ms), ``seq`` (event sequence of
the last event applied) and time buckets. A bucket is one flat row holding an accumulator
*slot* per distinct ``(source, field, family)`` the view needs, side by side:

- ``n``    count                      -> count
- ``s``    count, sum, sum of squares -> sum, mean, stddev
- ``mm``   min, max                   -> min, max
- ``last`` event time, value          -> last
- ``kmv``  [the 64 smallest 32-bit hashes] -> distinct (exact below 64 values)

and, last, the events applied to the bucket, as 64-bit hashes of their ids (8 bytes each,
in one ``bytearray``: the duplicate guard below).

Flat rows make a window's merge one transpose (``zip(*rows)``) and a C-level ``sum``,
``min`` or ``max`` per column; the vector itself is code generated from the view
(:mod:`services.features.vector_code`), with a per-state window cache.

An event is applied at most once: its sequence must be newer than ``seq`` (a redelivered
message), and its event id must not be among the ids already applied to its bucket (the
same event sent again, in another batch, through another path or after a restart: it has
the same id and time, so the same bucket). The decision depends only on the stream's
content, so every view version, replay and recomputation makes it alike. One older than the
longest window behind the watermark is *late*: not applied, counted, and kept in the raw
history by the caller (a resent copy of an evicted bucket's event is late too).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec

from services.features.slots import FRESH, kmv_add, slot_key
from services.features.vector_code import compile_values
from services.features.views import FeatureView

_enc = msgspec.msgpack.Encoder()
_dec = msgspec.msgpack.Decoder()
STATE_FORMAT = 4  # the first element of an encoded state; bump when the row layout changes
# format 2 rows had no event-id slot: it is appended (empty) when such a state is read;
# format 3 kept the ids as strings: they are hashed when such a state is read


def id_hash(event_id: str) -> bytes:
    """An event id as the 8 bytes the duplicate guard keeps: per id ~8 bytes of memory and
    of Redis instead of ~60 for the string (a busy entity applies thousands per window). Two
    distinct ids of one bucket collide with probability ~n^2 / 2^65."""
    return hashlib.blake2b(event_id.encode(), digest_size=8).digest()


def seen(ids: bytes | bytearray, h8: bytes) -> bool:
    """Whether the 8-byte hash ``h8`` is one of the aligned entries of ``ids``."""
    i = ids.find(h8)
    while i >= 0:
        if not i % 8:
            return True
        i = ids.find(h8, i + 1)  # a match across two entries: keep looking
    return False


def _array_header(n: int) -> bytes:
    """The msgpack header of an array of ``n`` elements."""
    if n < 16:
        return bytes((0x90 | n,))
    if n < 0x10000:
        return b"\xdc" + n.to_bytes(2, "big")
    return b"\xdd" + n.to_bytes(4, "big")


@dataclass
class EntityState:
    seq: int = 0
    watermark: int = 0
    late: int = 0
    buckets: dict[int, list[Any]] = field(default_factory=dict)
    # Transient (never stored or compared): each window's aggregate of every bucket but the
    # newest, valid while events only land in the newest bucket (see ``compile_values``).
    rest: tuple[Any, ...] | None = field(default=None, compare=False, repr=False)
    # Transient: (count, joined msgpack encodings of ``(bucket, row)``, the last bucket
    # encoded) for the oldest buckets, never the newest. Events only ever land in the
    # newest bucket or open a newer one; any other change drops it (``WindowEngine.apply``).
    prefix: tuple[int, bytes, int] | None = field(default=None, compare=False, repr=False)

    def to_list(self) -> list[Any]:
        """The state as msgpack-ready builtins."""
        return [STATE_FORMAT, self.seq, self.watermark, self.late, list(self.buckets.items())]

    def encodable(self) -> list[Any]:
        """Encodes to the same bytes as :meth:`to_list`, reusing the encoding of the
        buckets that did not change: a state is written on every batch that touches it,
        and walking every bucket's row was a quarter of the features service's CPU. Only
        the newest bucket, and any that stopped being the newest since, are encoded."""
        buckets = self.buckets
        if not buckets:
            return self.to_list()
        items = reversed(buckets.items())
        newest = next(items)
        p = self.prefix
        added: list[tuple[int, list[Any]]] = []  # newest first
        if p is not None:
            for pair in items:
                if pair[0] == p[2]:
                    break
                added.append(pair)
            else:
                p = None  # not expected: the encoded buckets are gone
        if p is None:
            older = list(buckets.items())[:-1]
            if older:
                blob = _enc.encode(older)
                p = (len(older), blob[len(_array_header(len(older))) :], older[-1][0])
            self.prefix = p
        elif added:
            added.reverse()
            blob = _enc.encode(added)
            p = self.prefix = (
                p[0] + len(added),
                p[1] + blob[len(_array_header(len(added))) :],
                added[-1][0],
            )
        count, encoded = (p[0], p[1]) if p is not None else (0, b"")
        rows = _array_header(count + 1) + encoded + _enc.encode(newest)
        return [STATE_FORMAT, self.seq, self.watermark, self.late, msgspec.Raw(rows)]

    @classmethod
    def from_list(cls, doc: list[Any]) -> EntityState:
        fmt, seq, wm, late, rows = doc
        if fmt == 2:
            return cls(seq, wm, late, {int(b): [*row, bytearray()] for b, row in rows})
        if fmt == 3:
            return cls(
                seq,
                wm,
                late,
                {
                    int(b): [*row[:-1], bytearray(b"".join(id_hash(i) for i in row[-1]))]
                    for b, row in rows
                },
            )
        if fmt != STATE_FORMAT:
            raise ValueError(f"entity state format {fmt}, this build reads {STATE_FORMAT}")
        return cls(seq, wm, late, {int(b): row for b, row in rows})  # encoded in time order

    def encode(self) -> bytes:
        return _enc.encode(self.encodable())

    @classmethod
    def decode(cls, blob: bytes) -> EntityState:
        return cls.from_list(_dec.decode(blob))

    def copy(self) -> EntityState:
        return EntityState(
            self.seq,
            self.watermark,
            self.late,
            {
                b: [
                    list(x)
                    if isinstance(x, list)
                    else bytearray(x)
                    if isinstance(x, bytes | bytearray)
                    else x
                    for x in row
                ]
                for b, row in self.buckets.items()
            },
        )


class Outcome:
    APPLIED = 0
    DUPLICATE = 1
    LATE = 2


class WindowEngine:
    """Applies events to entity states and computes the view's feature vector."""

    def __init__(self, view: FeatureView, dedupe: bool = True) -> None:
        """``dedupe=False`` turns the event-id guard off (a control for fault tests: a
        resent event is then counted twice)."""
        self.view = view
        self.dedupe = dedupe
        self.bucket_ms = view.bucket_s * 1000
        self.horizon_buckets = view.max_window_s // view.bucket_s
        offsets: dict[tuple[str, str, str], int] = {}
        fresh: list[Any] = []
        for f in view.features:
            if f.kind != "ratio":
                key = slot_key(f)
                if key not in offsets:
                    offsets[key] = len(fresh)
                    fresh.extend(FRESH[key[2]])
        self.ids_at = len(fresh)  # the row's last slot: ids of the events applied to it
        fresh.append(None)  # replaced by a new list per bucket
        self._fresh = fresh
        self._kmv_at = [at for (_, _, fam), at in offsets.items() if fam == "kmv"]
        self.by_source: dict[str, list[tuple[int, str, str]]] = {}
        for (src, fld, fam), at in offsets.items():
            self.by_source.setdefault(src, []).append((at, fld, fam))
        self._names = view.feature_names
        self._offsets = offsets
        self.values: Callable[[EntityState], list[float]] = compile_values(
            view, offsets, self._new_row()
        )
        """Feature values as of the entity's watermark, in the view's feature order."""

    def _new_row(self) -> list[Any]:
        row = list(self._fresh)
        for at in self._kmv_at:
            row[at] = []
        row[self.ids_at] = bytearray()
        return row

    def apply(
        self,
        st: EntityState,
        seq: int,
        event_type: str,
        event_time: int,
        payload: Any,
        event_id: str = "",
    ) -> int:
        """Mutates ``st``; returns an :class:`Outcome` code. Raises whatever the view's code
        raises (the caller stops the view: that is not the event's fault)."""
        if seq <= st.seq:
            return Outcome.DUPLICATE
        st.seq = seq
        bucket = event_time // self.bucket_ms
        current = max(st.watermark, event_time) // self.bucket_ms
        if bucket <= current - self.horizon_buckets:
            st.late += 1
            return Outcome.LATE
        # Every event of the view's sources marks its bucket as activity (session windows).
        row = st.buckets.get(bucket)
        h8 = id_hash(event_id) if self.dedupe and event_id else b""
        if row is not None and h8 and seen(row[self.ids_at], h8):
            return Outcome.DUPLICATE  # the same event again: its bucket has its id
        behind = bool(st.buckets) and bucket < next(reversed(st.buckets))
        if behind:
            st.prefix = None  # an older bucket changes: so does their encoding
        if bucket != current:
            st.rest = None  # a bucket before the newest changes: so do the window aggregates
        # (a new newest bucket keeps the cache: the vector rolls it forward)
        if row is None:
            row = st.buckets[bucket] = self._new_row()
            if behind:
                # keep buckets in time order (out of order is rare): sums then add up in the
                # same order live, after a restart and in an offline recomputation
                st.buckets = dict(sorted(st.buckets.items()))
        if h8:
            ids = row[self.ids_at]
            if type(ids) is not bytearray:  # as decoded from Redis: bytes
                ids = row[self.ids_at] = bytearray(ids)
            ids += h8
        targets = self.by_source.get(event_type)
        if targets:
            for at, fld, fam in targets:
                if fam == "n":
                    row[at] += 1
                    continue
                value = getattr(payload, fld, None)
                if value is None:  # null, or a field this schema version lacks: skipped
                    continue
                if fam == "s":
                    x = float(value)
                    row[at] += 1
                    row[at + 1] += x
                    row[at + 2] += x * x
                elif fam == "mm":
                    x = float(value)
                    if row[at] is None or x < row[at]:
                        row[at] = x
                    if row[at + 1] is None or x > row[at + 1]:
                        row[at + 1] = x
                elif fam == "last":
                    if event_time >= row[at]:
                        row[at], row[at + 1] = event_time, float(value)
                else:
                    kmv_add(row[at], value)
        if event_time > st.watermark:
            st.watermark = event_time
            floor = current - self.horizon_buckets
            if len(st.buckets) > 1 and next(iter(st.buckets)) <= floor:  # in time order
                for b in [b for b in st.buckets if b <= floor]:
                    del st.buckets[b]
                st.prefix = None
        return Outcome.APPLIED

    def smoke_test(self) -> None:
        """Run the generated vector code on an empty state, a state of two buckets and the
        roll to a third: a definition the generated code cannot handle fails here, at
        registration, not on its first event."""
        st = EntityState()
        self.values(st)
        st.buckets = {0: self._new_row(), 1: self._new_row()}
        st.watermark = self.bucket_ms
        self.values(st)
        st.buckets[2] = self._new_row()
        st.watermark = 2 * self.bucket_ms
        self.values(st)

    def mark_late(self, st: EntityState, seq: int) -> int:
        """Late by its partition's watermark: not applied, but seen (a redelivery is a duplicate)."""
        if seq <= st.seq:
            return Outcome.DUPLICATE
        st.seq = seq
        st.late += 1
        return Outcome.LATE

    def vector(self, st: EntityState) -> dict[str, float]:
        """Feature values as of the entity's watermark, by name."""
        return dict(zip(self._names, self.values(st), strict=True))
