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
    # Transient (never stored or compared): each window's aggregate of every bucket but the
    # newest, valid while events only land in the newest bucket (see ``compile_values``).
    rest: tuple[Any, ...] | None = field(default=None, compare=False, repr=False)

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


def _min_present(col: tuple[Any, ...]) -> Any:
    return min((v for v in col if v is not None), default=None)


def _max_present(col: tuple[Any, ...]) -> Any:
    return max((v for v in col if v is not None), default=None)


def _low2(rest: Any, cur: Any) -> float:
    x = rest if cur is None else cur if rest is None else min(rest, cur)
    return math.nan if x is None else float(x)


def _high2(rest: Any, cur: Any) -> float:
    x = rest if cur is None else cur if rest is None else max(rest, cur)
    return math.nan if x is None else float(x)


def _last_pair(times: tuple[Any, ...], vals: tuple[Any, ...]) -> tuple[Any, Any]:
    """The newest (time, value) of the rest; the first one on a tie (like ``_last``)."""
    if not times:
        return (-2, None)
    i = times.index(max(times))
    return (times[i], vals[i])


def _last2(rest: tuple[Any, Any], t: Any, v: Any) -> float:
    x = v if t > rest[0] else rest[1]
    return math.nan if x is None else float(x)


def _kmv_union(slots: Any) -> list[int]:
    return sorted(set().union(*slots))[:KMV_K]


def _distinct_with(rest: list[int], cur: list[int]) -> float:
    """Distinct count of the rest's sketch plus the newest bucket's (both sorted)."""
    if not cur:
        return _distinct(rest)
    if not rest:
        return _distinct(cur)
    return _distinct(sorted(set(rest).union(cur))[:KMV_K])


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


# How a feature's window aggregate over the *rest* (every bucket but the newest) is
# computed (``R`` = those rows), and how the newest bucket's row ``cur`` is folded in.
# Python's ``sum`` adds left to right, so ``sum(rest) + cur`` is bit-identical to the sum
# of the whole window: the fast path changes no value, not even in the last bit.
_REST = {  # T = the rest's rows transposed (one tuple per column)
    "sum": "sum(T[{c}])",
    "min": "_min_present(T[{c}])",
    "max": "_max_present(T[{c}])",
    "last": "_last_pair(T[{c}], T[{c1}])",
    "kmv": "_kmv_union(T[{c}])",
}
_NEEDS: dict[str, list[tuple[str, int]]] = {  # (rest aggregate, column offset in the slot)
    "count": [("sum", 0)],
    "sum": [("sum", 1)],
    "mean": [("sum", 0), ("sum", 1)],
    "stddev": [("sum", 0), ("sum", 1), ("sum", 2)],
    "min": [("min", 0)],
    "max": [("max", 1)],
    "last": [("last", 0)],
    "distinct": [("kmv", 0)],
}
_COMBINE = {  # a{k} = the rest aggregates the feature needs, in _NEEDS order
    "count": "float({a0} + cur[{at}])",
    "sum": "float({a0} + cur[{at1}])",
    "mean": "_mean({a0} + cur[{at}], {a1} + cur[{at1}])",
    "stddev": "_stddev({a0} + cur[{at}], {a1} + cur[{at1}], {a2} + cur[{at2}])",
    "min": "_low2({a0}, cur[{at}])",
    "max": "_high2({a0}, cur[{at1}])",
    "last": "_last2({a0}, cur[{at}], cur[{at1}])",
    "distinct": "_distinct_with({a0}, cur[{at}])",
}


_EXTEND = {  # the rest aggregate ``g`` extended by one more bucket row ``prev``
    "sum": "{g} + prev[{c}]",
    "min": "_low_of({g}, prev[{c}])",
    "max": "_high_of({g}, prev[{c}])",
    "last": "({g} if prev[{c}] <= {g}[0] else (prev[{c}], prev[{c1}]))",
    "kmv": "_kmv_union(({g}, prev[{c}]))",
}


def _low_of(a: Any, b: Any) -> Any:
    return a if b is None else b if a is None else min(a, b)


def _high_of(a: Any, b: Any) -> Any:
    return a if b is None else b if a is None else max(a, b)


def compile_values(
    view: FeatureView, offsets: dict[tuple[str, str, str], int], fresh_row: list[Any]
) -> Callable[[EntityState], list[float]]:
    """The view's feature vector as one function generated from its definition: straight
    Python with no per-feature dispatch (it runs once per applied event).

    Every window ends at the current (newest) bucket, and buckets are kept in time order,
    so a window is a suffix of them. Each window's aggregates over all buckets but the
    newest (the *rest*) are cached on the state (``EntityState.rest``, with the newest
    bucket and each window's first bucket), and the newest bucket is folded in on every
    call. When a new minute opens a new newest bucket, the cache rolls forward: a window
    that still starts at the same bucket extends its rest by the previous newest bucket;
    only a window whose start moved is recomputed. The cost per event does not grow with
    the number of buckets in the window, and the values are bit-identical to a full
    recomputation (sums still add up left to right)."""
    windows: list[tuple[str, int, int]] = []
    for f in view.features:
        if f.kind != "ratio":
            w = (f.window, f.window_s // view.bucket_s, f.gap_s // view.bucket_s)
            if w not in windows:
                windows.append(w)
    aggs: list[tuple[int, str, int]] = []  # (window, rest aggregate, column)
    uses: list[tuple[int, str, list[int], int]] = []  # (feature index, kind, agg indexes, at)
    for k, f in enumerate(view.features):
        if f.kind == "ratio":
            continue
        wi = windows.index((f.window, f.window_s // view.bucket_s, f.gap_s // view.bucket_s))
        at = offsets[WindowEngine._slot_key(f)]
        idx = []
        for op, off in _NEEDS[f.kind]:
            key = (wi, op, at + off)
            if key not in aggs:
                aggs.append(key)
            idx.append(aggs.index(key))
        uses.append((k, f.kind, idx, at))
    by_window: dict[int, list[int]] = {}
    for j, (wi, _, _) in enumerate(aggs):
        by_window.setdefault(wi, []).append(j)
    nw = len(windows)
    g_names = ", ".join(f"g{j}" for j in range(len(aggs)))
    cache = f"(keys[-1], {', '.join(f'keys[s{i}]' for i in range(nw))}, {g_names})"
    bucket_ms = view.bucket_s * 1000

    def starts(indent: str) -> list[str]:
        out = []
        for i, (kind, nb, gap) in enumerate(windows):
            if kind == "sliding":
                start = f"_bisect_right(keys, current - {nb})"
            elif kind == "tumbling":
                start = f"_bisect_left(keys, (current // {nb}) * {nb})"
            else:
                start = f"_session_start(keys, current, {gap}, {nb})"
            out.append(f"{indent}s{i} = {start}")
        return out

    def recompute(wi: int, indent: str, shared: list[int]) -> list[str]:
        # windows that start at the same bucket share one transpose
        same = " else ".join(f"T{d} if s{wi} == s{d}" for d in shared)
        fresh = f"(list(zip(*rows[s{wi}:tail])) if s{wi} < tail else EMPTY_COLS)"
        out = [f"{indent}T{wi} = T = {same + ' else ' + fresh if same else fresh}"]
        for j in by_window[wi]:
            _, op, col = aggs[j]
            out.append(f"{indent}g{j} = {_REST[op].format(c=col, c1=col + 1)}")
        return out

    # roll(st, rest): the cache after one new newest bucket, or None
    roll = [
        "def roll(st, rest):",
        "    keys = list(st.buckets)",
        "    tail = len(keys) - 1",
        f"    current = st.watermark // {bucket_ms}",
        "    if tail < 1 or keys[tail - 1] != rest[0] or keys[tail] != current:",
        "        return None",
        "    rows = list(st.buckets.values())",
        "    prev = rows[tail - 1]",
        *starts("    "),
        f"    {g_names}, = rest[{1 + nw}:]",
    ]
    for wi in by_window:
        roll.append(f"    if keys[s{wi}] == rest[{1 + wi}]:")
        for j in by_window[wi]:
            _, op, col = aggs[j]
            roll.append(f"        g{j} = {_EXTEND[op].format(g=f'g{j}', c=col, c1=col + 1)}")
        roll.append("    else:")
        roll += recompute(wi, "        ", [])
    roll.append(f"    return {cache}")

    lines = [
        "def values(st):",
        "    buckets = st.buckets",
        "    if not buckets:",
        "        cur, rest = FRESH_ROW, EMPTY_REST",
        "    else:",
        "        cur = next(reversed(buckets.values()))",
        "        rest = st.rest",
        "        if rest is not None and rest[0] != next(reversed(buckets)):",
        "            st.rest = rest = roll(st, rest)",
        "        if rest is None:",
        "            keys = list(buckets)",
        "            rows = list(buckets.values())",
        f"            current = st.watermark // {bucket_ms}",
        "            tail = len(rows) - 1",
        "            if keys[-1] != current:  # not expected: then no bucket is 'the newest'",
        "                cur, tail = FRESH_ROW, len(rows)",
        *starts("            "),
    ]
    done: list[int] = []
    for wi in by_window:
        lines += recompute(wi, "            ", done)
        done.append(wi)
    lines += [
        "            if tail == len(rows):",
        f"                rest = ({', '.join(['None'] * (1 + nw))}, {g_names})  # not cacheable",
        "            else:",
        f"                st.rest = rest = {cache}",
        f"    {g_names}, = rest[{1 + nw}:]",
    ]
    for k, kind, idx, at in uses:
        a = {f"a{n}": f"g{j}" for n, j in enumerate(idx)}
        lines.append(f"    v{k} = " + _COMBINE[kind].format(at=at, at1=at + 1, at2=at + 2, **a))
    feature_names = view.feature_names
    for k, f in enumerate(view.features):
        if f.kind == "ratio":
            num, den = feature_names.index(f.numerator), feature_names.index(f.denominator)
            lines.append(f"    v{k} = v{num} / v{den} if v{den} else 0.0")
    lines.append("    return [" + ", ".join(f"v{k}" for k in range(len(feature_names))) + "]")
    scope: dict[str, Any] = {
        "_bisect_left": bisect_left,
        "_bisect_right": bisect_right,
        "_session_start": _session_start,
        "_mean": _mean,
        "_stddev": _stddev,
        "_low2": _low2,
        "_high2": _high2,
        "_last2": _last2,
        "_last_pair": _last_pair,
        "_min_present": _min_present,
        "_max_present": _max_present,
        "_low_of": _low_of,
        "_high_of": _high_of,
        "_kmv_union": _kmv_union,
        "_distinct_with": _distinct_with,
        "FRESH_ROW": fresh_row,
        "EMPTY_COLS": [() for _ in fresh_row],
    }
    # every aggregate over no rows (an entity with no events yet)
    empty = tuple(
        eval(_REST[op].format(c=col, c1=col + 1), scope, {"T": scope["EMPTY_COLS"]})  # noqa: S307 - our template
        for _, op, col in aggs
    )
    scope["EMPTY_REST"] = (None,) * (1 + nw) + empty
    source = "\n".join(roll) + "\n\n\n" + "\n".join(lines)
    exec(compile(source, f"<view {view.ref}>", "exec"), scope)  # noqa: S102 - generated from a validated definition
    fn: Callable[[EntityState], list[float]] = scope["values"]
    fn.__doc__ = source  # the generated code, for whoever debugs it
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
            view, offsets, self._new_row()
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
        if bucket != current:
            st.rest = None  # a bucket before the newest changes: so do the window aggregates
        # (a new newest bucket keeps the cache: the vector rolls it forward)
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
