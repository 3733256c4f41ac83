"""Pure windowing logic: per-entity bucketed state and event-time windows.

State per entity: ``watermark`` (newest event time seen, ms), ``seq`` (event sequence of
the last event applied) and time buckets. A bucket is one flat row holding an accumulator
*slot* per distinct ``(source, field, family)`` the view needs, side by side:

- ``n``    count                      -> count
- ``s``    count, sum, sum of squares -> sum, mean, stddev
- ``mm``   min, max                   -> min, max
- ``last`` event time, value          -> last
- ``kmv``  [the 64 smallest 32-bit hashes] -> distinct (exact below 64 values)

Flat rows make a window's merge one transpose (``zip(*rows)``) and a C-level ``sum``,
``min`` or ``max`` per column: Python's cost is per window, not per bucket and slot.

An event is applied at most once (its sequence must be newer than ``seq``); one older
than the longest window behind the watermark is *late*: not applied, counted, and kept
in the raw history by the caller.
"""

from __future__ import annotations

import math
import zlib
from bisect import bisect_left, bisect_right, insort
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec

from services.features.views import Feature, FeatureView

_enc = msgspec.msgpack.Encoder()
_dec = msgspec.msgpack.Decoder()
KMV_K = 64
STATE_FORMAT = 2  # the first element of an encoded state; bump when the row layout changes
FAMILY = {
    "count": "n",
    "sum": "s",
    "mean": "s",
    "stddev": "s",
    "min": "mm",
    "max": "mm",
    "last": "last",
    "distinct": "kmv",
}
# Empty slots are small ints and None (a state is written to Redis on every batch that
# touches its entity: msgpack spends 1 byte on 0 or nil, 9 on a float).
_FRESH: dict[str, list[Any]] = {
    "n": [0],
    "s": [0, 0, 0],
    "mm": [None, None],
    "last": [-1, None],
    "kmv": [None],  # replaced by a new list per bucket
}


@dataclass
class EntityState:
    seq: int = 0
    watermark: int = 0
    late: int = 0
    buckets: dict[int, list[Any]] = field(default_factory=dict)

    def to_list(self) -> list[Any]:
        """The state as msgpack-ready builtins."""
        return [STATE_FORMAT, self.seq, self.watermark, self.late, sorted(self.buckets.items())]

    @classmethod
    def from_list(cls, doc: list[Any]) -> EntityState:
        fmt, seq, wm, late, rows = doc
        if fmt != STATE_FORMAT:
            raise ValueError(f"entity state format {fmt}, this build reads {STATE_FORMAT}")
        return cls(seq, wm, late, {int(b): row for b, row in rows})  # encoded in time order

    def encode(self) -> bytes:
        return _enc.encode(self.to_list())

    @classmethod
    def decode(cls, blob: bytes) -> EntityState:
        return cls.from_list(_dec.decode(blob))

    def copy(self) -> EntityState:
        return EntityState(
            self.seq,
            self.watermark,
            self.late,
            {
                b: [list(x) if isinstance(x, list) else x for x in row]
                for b, row in self.buckets.items()
            },
        )


class Outcome:
    APPLIED = 0
    DUPLICATE = 1
    LATE = 2


def _kmv_add(slot: list[int], value: Any) -> None:
    h = zlib.crc32(str(value).encode())
    if h not in slot and (len(slot) < KMV_K or h < slot[-1]):
        insort(slot, h)
        del slot[KMV_K:]


def _distinct(hashes: list[int]) -> float:
    # exact below K, else the KMV estimate (K - 1) / (k-th smallest hash, scaled)
    if len(hashes) < KMV_K:
        return float(len(hashes))
    return float((KMV_K - 1) / ((hashes[-1] + 1) / 2**32))


def _reader(kind: str, at: int) -> Callable[[list[tuple[Any, ...]]], float]:
    """How a feature's value is read from a window's columns (``cols[at:]`` is its slot)."""
    if kind == "count":
        return lambda c: float(sum(c[at]))
    if kind == "sum":
        return lambda c: float(sum(c[at + 1]))
    if kind == "mean":

        def mean(c: list[tuple[Any, ...]]) -> float:
            n = sum(c[at])
            return float(sum(c[at + 1]) / n) if n else math.nan

        return mean
    if kind == "stddev":

        def stddev(c: list[tuple[Any, ...]]) -> float:
            n = sum(c[at])
            if not n:
                return math.nan
            mu = sum(c[at + 1]) / n
            return math.sqrt(max(sum(c[at + 2]) / n - mu * mu, 0.0))

        return stddev
    if kind == "min":

        def low(c: list[tuple[Any, ...]]) -> float:
            x = min((v for v in c[at] if v is not None), default=None)
            return math.nan if x is None else float(x)

        return low
    if kind == "max":

        def high(c: list[tuple[Any, ...]]) -> float:
            x = max((v for v in c[at + 1] if v is not None), default=None)
            return math.nan if x is None else float(x)

        return high
    if kind == "last":

        def last(c: list[tuple[Any, ...]]) -> float:
            t = c[at]
            v = c[at + 1][t.index(max(t))]
            return math.nan if v is None else float(v)

        return last

    def distinct(c: list[tuple[Any, ...]]) -> float:
        slots = c[at]
        if len(slots) == 1:
            return _distinct(slots[0])
        return _distinct(sorted(set().union(*slots))[:KMV_K])

    return distinct


class WindowEngine:
    """Applies events to entity states and computes the view's feature vector."""

    def __init__(self, view: FeatureView) -> None:
        self.view = view
        self.bucket_ms = view.bucket_s * 1000
        self.horizon_buckets = view.max_window_s // view.bucket_s
        offsets: dict[tuple[str, str, str], int] = {}
        fresh: list[Any] = []
        for f in view.features:
            if f.kind != "ratio":
                key = self._slot_key(f)
                if key not in offsets:
                    offsets[key] = len(fresh)
                    fresh.extend(_FRESH[key[2]])
        self._fresh = fresh
        self._kmv_at = [at for (_, _, fam), at in offsets.items() if fam == "kmv"]
        self.by_source: dict[str, list[tuple[int, str, str]]] = {}
        for (src, fld, fam), at in offsets.items():
            self.by_source.setdefault(src, []).append((at, fld, fam))
        self._names = view.feature_names
        # features grouped by window: (window, window buckets, gap buckets) -> [(index, reader)]
        self._windows: dict[tuple[str, int, int], list[tuple[int, Any]]] = {}
        at_name = {n: i for i, n in enumerate(self._names)}
        for i, f in enumerate(view.features):
            if f.kind != "ratio":
                wkey = (f.window, f.window_s // view.bucket_s, f.gap_s // view.bucket_s)
                reader = _reader(f.kind, offsets[self._slot_key(f)])
                self._windows.setdefault(wkey, []).append((i, reader))
        self._ratios = [
            (i, at_name[f.numerator], at_name[f.denominator])
            for i, f in enumerate(view.features)
            if f.kind == "ratio"
        ]
        self._empty_cols = [(x,) for x in self._new_row()]

    @staticmethod
    def _slot_key(f: Feature) -> tuple[str, str, str]:
        return (f.source, f.field if f.kind != "count" else "", FAMILY[f.kind])

    def _new_row(self) -> list[Any]:
        row = list(self._fresh)
        for at in self._kmv_at:
            row[at] = []
        return row

    def apply(
        self, st: EntityState, seq: int, event_type: str, event_time: int, payload: Any
    ) -> int:
        """Mutates ``st``; returns an :class:`Outcome` code."""
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
        if row is None:
            row = st.buckets[bucket] = self._new_row()
            if len(st.buckets) > 1 and bucket < max(st.buckets):
                # keep buckets in time order (out of order is rare): sums then add up in the
                # same order live, after a restart and in an offline recomputation
                st.buckets = dict(sorted(st.buckets.items()))
        targets = self.by_source.get(event_type)
        if targets:
            for at, fld, fam in targets:
                if fam == "n":
                    row[at] += 1
                    continue
                value = getattr(payload, fld)
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
                    _kmv_add(row[at], value)
        if event_time > st.watermark:
            st.watermark = event_time
            floor = current - self.horizon_buckets
            if len(st.buckets) > 1 and min(st.buckets) <= floor:
                for b in [b for b in st.buckets if b <= floor]:
                    del st.buckets[b]
        return Outcome.APPLIED

    def mark_late(self, st: EntityState, seq: int) -> int:
        """Late by its partition's watermark: not applied, but seen (a redelivery is a duplicate)."""
        if seq <= st.seq:
            return Outcome.DUPLICATE
        st.seq = seq
        st.late += 1
        return Outcome.LATE

    @staticmethod
    def _window_start(kind: str, nb: int, gap: int, keys: list[int], current: int) -> int:
        """Every window ends at the current bucket, and buckets are kept in time order, so
        a window is a suffix of them: the index where it starts."""
        if kind == "sliding":
            return bisect_right(keys, current - nb)
        if kind == "tumbling":
            return bisect_left(keys, (current // nb) * nb)
        # session: back from the newest bucket while the gaps stay within ``gap``
        i, prev = len(keys), current
        while i > 0:
            b = keys[i - 1]
            if prev - b > gap or current - b >= nb:
                break
            i -= 1
            prev = b
        return i

    def vector(self, st: EntityState) -> dict[str, float]:
        """Feature values as of the entity's watermark, by name."""
        return dict(zip(self._names, self.values(st), strict=True))

    def values(self, st: EntityState) -> list[float]:
        """Feature values as of the entity's watermark, in the view's feature order."""
        current = st.watermark // self.bucket_ms
        keys = list(st.buckets)
        rows = list(st.buckets.values())
        out: list[float] = [0.0] * len(self._names)
        by_start: dict[int, list[tuple[Any, ...]]] = {}
        for (kind, nb, gap), feats in self._windows.items():
            start = self._window_start(kind, nb, gap, keys, current)
            cols = by_start.get(start)
            if cols is None:
                cols = by_start[start] = (
                    list(zip(*rows[start:], strict=True)) if start < len(rows) else self._empty_cols
                )
            for i, read in feats:
                out[i] = read(cols)
        for i, num, den in self._ratios:
            d = out[den]
            out[i] = out[num] / d if d else 0.0
        return out
