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
        return [STATE_FORMAT, self.seq, self.watermark, self.late, list(self.buckets.items())]

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


def _mean(n: int, total: float) -> float:
    return float(total / n) if n else math.nan


def _stddev(n: int, total: float, squares: float) -> float:
    if not n:
        return math.nan
    mu = total / n
    return math.sqrt(max(squares / n - mu * mu, 0.0))


def _low(col: tuple[Any, ...]) -> float:
    x = min((v for v in col if v is not None), default=None)
    return math.nan if x is None else float(x)


def _high(col: tuple[Any, ...]) -> float:
    x = max((v for v in col if v is not None), default=None)
    return math.nan if x is None else float(x)


def _last(times: tuple[Any, ...], vals: tuple[Any, ...]) -> float:
    v = vals[times.index(max(times))]
    return math.nan if v is None else float(v)


def _distinct_of(slots: tuple[list[int], ...]) -> float:
    if len(slots) == 1:
        return _distinct(slots[0])
    return _distinct(sorted(set().union(*slots))[:KMV_K])


def _session_start(keys: list[int], current: int, gap: int, nb: int) -> int:
    """Back from the newest bucket while the gaps stay within ``gap`` (and the window)."""
    i, prev = len(keys), current
    while i > 0:
        b = keys[i - 1]
        if prev - b > gap or current - b >= nb:
            break
        i -= 1
        prev = b
    return i


_EXPR = {
    "count": "float(sum({c}[{at}]))",
    "sum": "float(sum({c}[{at1}]))",
    "mean": "_mean(sum({c}[{at}]), sum({c}[{at1}]))",
    "stddev": "_stddev(sum({c}[{at}]), sum({c}[{at1}]), sum({c}[{at2}]))",
    "min": "_low({c}[{at}])",
    "max": "_high({c}[{at1}])",
    "last": "_last({c}[{at}], {c}[{at1}])",
    "distinct": "_distinct_of({c}[{at}])",
}


def compile_values(
    view: FeatureView, offsets: dict[tuple[str, str, str], int], empty: list[tuple[Any, ...]]
) -> Callable[[EntityState], list[float]]:
    """The view's feature vector as one generated function: straight-line Python with no
    per-feature dispatch (a hot path: it runs once per applied event). Every window ends
    at the current bucket and buckets are kept in time order, so a window is a suffix of
    them; windows that start at the same bucket share one transpose of the rows."""
    lines = [
        "def values(st):",
        "    keys = list(st.buckets)",
        "    rows = list(st.buckets.values())",
        "    n = len(rows)",
        f"    current = st.watermark // {view.bucket_s * 1000}",
    ]
    windows: list[tuple[str, int, int]] = []
    for f in view.features:
        if f.kind != "ratio":
            w = (f.window, f.window_s // view.bucket_s, f.gap_s // view.bucket_s)
            if w not in windows:
                windows.append(w)
    for i, (kind, nb, gap) in enumerate(windows):
        if kind == "sliding":
            start = f"_bisect_right(keys, current - {nb})"
        elif kind == "tumbling":
            start = f"_bisect_left(keys, (current // {nb}) * {nb})"
        else:
            start = f"_session_start(keys, current, {gap}, {nb})"
        lines.append(f"    s{i} = {start}")
        same = " else ".join(f"c{j} if s{i} == s{j}" for j in range(i))
        fresh = f"(list(zip(*rows[s{i}:])) if s{i} < n else EMPTY)"
        lines.append(f"    c{i} = {same + ' else ' + fresh if same else fresh}")
    names = view.feature_names
    for k, f in enumerate(view.features):
        if f.kind == "ratio":
            continue
        wi = windows.index((f.window, f.window_s // view.bucket_s, f.gap_s // view.bucket_s))
        at = offsets[WindowEngine._slot_key(f)]
        expr = _EXPR[f.kind].format(c=f"c{wi}", at=at, at1=at + 1, at2=at + 2)
        lines.append(f"    v{k} = {expr}")
    for k, f in enumerate(view.features):
        if f.kind == "ratio":
            num, den = names.index(f.numerator), names.index(f.denominator)
            lines.append(f"    v{k} = v{num} / v{den} if v{den} else 0.0")
    lines.append("    return [" + ", ".join(f"v{k}" for k in range(len(names))) + "]")
    scope: dict[str, Any] = {
        "_bisect_left": bisect_left,
        "_bisect_right": bisect_right,
        "_session_start": _session_start,
        "_mean": _mean,
        "_stddev": _stddev,
        "_low": _low,
        "_high": _high,
        "_last": _last,
        "_distinct_of": _distinct_of,
        "EMPTY": empty,
    }
    exec(compile("\n".join(lines), f"<view {view.ref}>", "exec"), scope)  # noqa: S102 - generated from a validated definition
    fn: Callable[[EntityState], list[float]] = scope["values"]
    fn.__doc__ = "\n".join(lines)  # the generated source, for whoever debugs it
    return fn


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
        self._offsets = offsets
        self.values: Callable[[EntityState], list[float]] = compile_values(
            view, offsets, [(x,) for x in self._new_row()]
        )
        """Feature values as of the entity's watermark, in the view's feature order."""

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

    def vector(self, st: EntityState) -> dict[str, float]:
        """Feature values as of the entity's watermark, by name."""
        return dict(zip(self._names, self.values(st), strict=True))
