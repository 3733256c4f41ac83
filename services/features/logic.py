"""Pure windowing logic: per-entity bucketed state and event-time windows.

State per entity: ``watermark`` (newest event time seen, ms), ``seq`` (event sequence of
the last event applied) and time buckets. A bucket holds one accumulator *slot* per
distinct ``(source, field, family)`` the view needs:

- ``n``    [count]                      -> count
- ``s``    [count, sum, sum of squares] -> sum, mean, stddev
- ``mm``   [min, max]                   -> min, max
- ``last`` [event time, value]          -> last
- ``kmv``  the 64 smallest 32-bit hashes -> distinct (exact below 64 values)

An event is applied at most once (its sequence must be newer than ``seq``); one older
than the longest window behind the watermark is *late*: not applied, counted, and kept
in the raw history by the caller.
"""

from __future__ import annotations

import math
import zlib
from bisect import insort
from dataclasses import dataclass, field
from typing import Any

import msgspec

from services.features.views import Feature, FeatureView

_enc = msgspec.msgpack.Encoder()
_dec = msgspec.msgpack.Decoder()
KMV_K = 64
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


def _init(family: str) -> list[Any]:
    if family == "n":
        return [0]
    if family == "s":
        return [0, 0.0, 0.0]
    if family == "mm":
        return [math.inf, -math.inf]
    if family == "last":
        return [-1, math.nan]
    return []  # kmv


def _add(family: str, slot: list[Any], value: Any, t: int) -> None:
    if family == "n":
        slot[0] += 1
    elif family == "s":
        x = float(value)
        slot[0] += 1
        slot[1] += x
        slot[2] += x * x
    elif family == "mm":
        x = float(value)
        slot[0] = min(slot[0], x)
        slot[1] = max(slot[1], x)
    elif family == "last":
        if t >= slot[0]:
            slot[0], slot[1] = t, float(value)
    else:
        h = zlib.crc32(str(value).encode())
        if h not in slot and (len(slot) < KMV_K or h < slot[-1]):
            insort(slot, h)
            del slot[KMV_K:]


def _merge(family: str, slots: list[list[Any]]) -> list[Any]:
    if not slots:
        return _init(family)
    if family == "n":
        return [sum(s[0] for s in slots)]
    if family == "s":
        return [sum(s[0] for s in slots), sum(s[1] for s in slots), sum(s[2] for s in slots)]
    if family == "mm":
        return [min(s[0] for s in slots), max(s[1] for s in slots)]
    if family == "last":
        newest: list[Any] = max(slots, key=lambda s: s[0])
        return list(newest)
    return sorted(set().union(*slots))[:KMV_K]  # kmv: one union, one sort


def _value(kind: str, m: list[Any]) -> float:
    if kind == "count":
        return float(m[0])
    if kind == "sum":
        return float(m[1])
    if kind == "mean":
        return float(m[1] / m[0]) if m[0] else math.nan
    if kind == "stddev":
        if not m[0]:
            return math.nan
        mean = m[1] / m[0]
        return math.sqrt(max(m[2] / m[0] - mean * mean, 0.0))
    if kind == "min":
        return float(m[0]) if m[0] != math.inf else math.nan
    if kind == "max":
        return float(m[1]) if m[1] != -math.inf else math.nan
    if kind == "last":
        return float(m[1])
    # distinct: exact below K, else the KMV estimate (K - 1) / (k-th smallest hash, scaled)
    if len(m) < KMV_K:
        return float(len(m))
    return float((KMV_K - 1) / ((m[-1] + 1) / 2**32))


@dataclass
class EntityState:
    seq: int = 0
    watermark: int = 0
    late: int = 0
    buckets: dict[int, list[list[Any]]] = field(default_factory=dict)

    def encode(self) -> bytes:
        return _enc.encode(
            [
                self.seq,
                self.watermark,
                self.late,
                [[b, *slots] for b, slots in sorted(self.buckets.items())],
            ]
        )

    @classmethod
    def decode(cls, blob: bytes) -> EntityState:
        seq, wm, late, rows = _dec.decode(blob)
        return cls(seq, wm, late, {int(r[0]): [list(s) for s in r[1:]] for r in rows})

    def copy(self) -> EntityState:
        return EntityState(
            self.seq,
            self.watermark,
            self.late,
            {b: [list(s) for s in slots] for b, slots in self.buckets.items()},
        )


class Outcome:
    APPLIED = 0
    DUPLICATE = 1
    LATE = 2


class WindowEngine:
    """Applies events to entity states and computes the view's feature vector."""

    def __init__(self, view: FeatureView) -> None:
        self.view = view
        self.bucket_ms = view.bucket_s * 1000
        self.horizon_buckets = view.max_window_s // view.bucket_s
        slots: list[tuple[str, str, str]] = []
        for f in view.features:
            if f.kind != "ratio":
                key = (f.source, f.field if f.kind != "count" else "", FAMILY[f.kind])
                if key not in slots:
                    slots.append(key)
        self.slots = slots
        self._fresh = [_init(fam) for _, _, fam in slots]
        self.by_source: dict[str, list[tuple[int, str, str]]] = {}
        for i, (src, fld, fam) in enumerate(slots):
            self.by_source.setdefault(src, []).append((i, fld, fam))
        self._names = view.feature_names
        self._plain = [
            (
                f,
                (f.window, f.window_s, f.gap_s),
                slots.index((f.source, f.field if f.kind != "count" else "", FAMILY[f.kind])),
            )
            for f in view.features
            if f.kind != "ratio"
        ]
        self._ratios = [f for f in view.features if f.kind == "ratio"]

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
            row = st.buckets[bucket] = [list(s) for s in self._fresh]
        targets = self.by_source.get(event_type)
        if targets:
            for idx, fld, fam in targets:
                _add(fam, row[idx], getattr(payload, fld) if fld else None, event_time)
        if event_time > st.watermark:
            st.watermark = event_time
            floor = current - self.horizon_buckets
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

    def _window(self, f: Feature, st: EntityState, current: int) -> list[int]:
        nb = f.window_s // self.view.bucket_s
        if f.window == "tumbling":
            start = (current // nb) * nb
            return [b for b in st.buckets if start <= b <= current]
        if f.window == "session":
            gap = f.gap_s // self.view.bucket_s
            chosen: list[int] = []
            prev = current
            for b in sorted(st.buckets, reverse=True):
                if b > current:
                    continue
                if prev - b > gap or current - b >= nb:
                    break
                chosen.append(b)
                prev = b
            return chosen
        return [b for b in st.buckets if current - b < nb]

    def vector(self, st: EntityState) -> dict[str, float]:
        """Feature values as of the entity's watermark."""
        current = st.watermark // self.bucket_ms
        buckets = st.buckets
        windows: dict[tuple[str, int, int], list[int]] = {}
        merged: dict[tuple[tuple[str, int, int], int], list[Any]] = {}
        values: dict[str, float] = {}
        for f, wkey, slot in self._plain:
            bs = windows.get(wkey)
            if bs is None:
                bs = windows[wkey] = self._window(f, st, current)
            mkey = (wkey, slot)
            m = merged.get(mkey)
            if m is None:
                fam = self.slots[slot][2]
                m = _merge(fam, [buckets[b][slot] for b in bs])
                merged[mkey] = m
            values[f.name] = _value(f.kind, m)
        for f in self._ratios:
            d = values[f.denominator]
            values[f.name] = values[f.numerator] / d if d else 0.0
        return {n: values[n] for n in self._names}
