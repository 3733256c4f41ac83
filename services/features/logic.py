"""Pure windowing logic: per-entity bucketed state, event-time sliding windows.

State per entity: ``watermark`` (newest event time seen, ms), ``seq`` (stream sequence
of the last event applied) and time buckets of counters. An event is applied at most
once (its sequence must be newer than ``seq``); one older than the longest window
behind the watermark is *late*: not applied to the online state, counted, and still
stored in the raw history by the caller.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgspec

from services.features.views import FeatureView

_enc = msgspec.msgpack.Encoder()
_dec = msgspec.msgpack.Decoder()


class Counters:
    """The distinct (source, field) counters a view needs, and how features read them."""

    def __init__(self, view: FeatureView) -> None:
        keys: list[tuple[str, str]] = []
        for f in view.features:
            if f.kind in ("count", "sum"):
                k = (f.source, f.field if f.kind == "sum" else "")
                if k not in keys:
                    keys.append(k)
        self.keys = keys
        self.by_source: dict[str, list[tuple[int, str]]] = {}
        for i, (src, fld) in enumerate(keys):
            self.by_source.setdefault(src, []).append((i, fld))


@dataclass
class EntityState:
    seq: int = 0
    watermark: int = 0
    late: int = 0
    buckets: dict[int, list[float]] = field(default_factory=dict)

    def encode(self) -> bytes:
        return _enc.encode(
            [
                self.seq,
                self.watermark,
                self.late,
                [[b, *v] for b, v in sorted(self.buckets.items())],
            ]
        )

    @classmethod
    def decode(cls, blob: bytes) -> EntityState:
        seq, wm, late, rows = _dec.decode(blob)
        return cls(seq, wm, late, {int(r[0]): [float(x) for x in r[1:]] for r in rows})

    def copy(self) -> EntityState:
        return EntityState(
            self.seq, self.watermark, self.late, {b: list(v) for b, v in self.buckets.items()}
        )


class Outcome:
    APPLIED = 0
    DUPLICATE = 1
    LATE = 2


class WindowEngine:
    """Applies events to entity states and computes the view's feature vector."""

    def __init__(self, view: FeatureView) -> None:
        self.view = view
        self.counters = Counters(view)
        self.bucket_ms = view.bucket_s * 1000
        self.horizon_buckets = view.max_window_s // view.bucket_s
        self._plan = [
            (
                f.name,
                f.kind,
                self.counters.keys.index((f.source, f.field if f.kind == "sum" else ""))
                if f.kind != "ratio"
                else -1,
                f.window_s // view.bucket_s if f.kind != "ratio" else 0,
                f.numerator,
                f.denominator,
            )
            for f in sorted(view.features, key=lambda f: f.kind == "ratio")
        ]
        self._names = view.feature_names
        self._spans = sorted({p[3] for p in self._plan if p[1] != "ratio"})
        self._span_index = {nb: i for i, nb in enumerate(self._spans)}

    def apply(
        self, st: EntityState, seq: int, event_type: str, event_time: int, payload: Any
    ) -> int:
        """Mutates ``st``; returns an :class:`Outcome` code."""
        if seq <= st.seq:
            return Outcome.DUPLICATE
        st.seq = seq
        targets = self.counters.by_source.get(event_type)
        bucket = event_time // self.bucket_ms
        current = max(st.watermark, event_time) // self.bucket_ms
        if bucket <= current - self.horizon_buckets:
            st.late += 1
            return Outcome.LATE
        if targets:
            row = st.buckets.get(bucket)
            if row is None:
                row = st.buckets[bucket] = [0.0] * len(self.counters.keys)
            for idx, fld in targets:
                row[idx] += float(getattr(payload, fld)) if fld else 1.0
        if event_time > st.watermark:
            st.watermark = event_time
            floor = current - self.horizon_buckets
            for b in [b for b in st.buckets if b <= floor]:
                del st.buckets[b]
        return Outcome.APPLIED

    def vector(self, st: EntityState) -> dict[str, float]:
        """Feature values as of the entity's watermark: one pass over the buckets sums every
        counter for every window length, then each feature reads its sum."""
        current = st.watermark // self.bucket_ms
        spans = self._spans
        sums = [[0.0] * len(self.counters.keys) for _ in spans]
        for b, row in st.buckets.items():
            age = current - b
            for w, nb in enumerate(spans):
                if age < nb:
                    acc = sums[w]
                    for c, x in enumerate(row):
                        acc[c] += x
        values: dict[str, float] = {}
        for name, kind, idx, nb, num, den in self._plan:
            if kind == "ratio":
                d = values[den]
                values[name] = values[num] / d if d else 0.0
            else:
                values[name] = sums[self._span_index[nb]][idx]
        return {n: values[n] for n in self._names}
