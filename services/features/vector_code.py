"""The feature vector of a view as Python generated from its definition.

One function per view, straight code with no per-feature dispatch: it runs once per
applied event. See :func:`compile_values` for the window cache that makes its cost
independent of the window length.
"""

from __future__ import annotations

import linecache
import math
from bisect import bisect_left, bisect_right
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from services.features.slots import KMV_K, slot_key
from services.features.views import FeatureView

if TYPE_CHECKING:
    from services.features.logic import EntityState


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


_FEW = 4  # up to this many hashes are inserted by bisection; more go through a set


def _kmv_merge(a: list[int], b: list[int]) -> list[int]:
    """``sorted(set(a) | set(b))[:KMV_K]`` for two sketches (sorted, distinct, at most
    ``KMV_K`` long). A bucket's sketch is often a few hashes: those are inserted by
    bisection into a copy of the other sketch instead of building a set and sorting."""
    if not b:
        return a
    if not a:
        return b
    if len(b) > len(a):
        a, b = b, a
    if len(b) > _FEW:
        return sorted(set(a).union(b))[:KMV_K]
    out = list(a)
    for h in b:
        i = bisect_left(out, h)
        if i == len(out) or out[i] != h:
            out.insert(i, h)
    del out[KMV_K:]
    return out


def _kmv_rest(hashes: list[int]) -> tuple[list[int], frozenset[int]]:
    """A window's sketch of every bucket but the newest, with its members as a set: the
    newest bucket is folded in on every event, and membership tests are what that costs."""
    return (hashes, frozenset(hashes))


def _distinct_with(rest: tuple[list[int], frozenset[int]], cur: list[int]) -> float:
    """Distinct count of the rest's sketch plus the newest bucket's: equal to
    ``_distinct(sorted(set(rest) | set(cur))[:KMV_K])``, without building that union."""
    hashes, members = rest
    new = [h for h in cur if h not in members]
    if not new:
        return _distinct(hashes)
    if not hashes:
        return _distinct(cur)
    n = len(hashes) + len(new)
    if n < KMV_K:  # the rest's sketch is not full, so it holds all its hashes: exact
        return float(n)
    return _distinct(sorted(hashes + new)[:KMV_K])  # two sorted runs: one merge


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
    "kmv": "_kmv_rest(_kmv_union(T[{c}]))",
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
    "kmv": "_kmv_rest(_kmv_merge({g}[0], prev[{c}]))",
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
        at = offsets[slot_key(f)]
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

    def kept(i: int, kind: str, nb: int, gap: int) -> str:
        # True when window i still starts at the bucket it started at (``rest[1 + i]``)
        # after one new newest bucket: no list of the buckets is needed then.
        if kind == "sliding":
            return f"rest[{1 + i}] > current - {nb}"
        if kind == "tumbling":
            return f"rest[{1 + i}] >= (current // {nb}) * {nb}"
        return f"current - before <= {gap} and current - rest[{1 + i}] < {nb}"

    # roll(st, rest): the cache after one new newest bucket, or None
    starts_now = starts("        ")
    roll = [
        "def roll(st, rest):",
        "    buckets = st.buckets",
        "    newer = reversed(buckets)",
        "    newest = next(newer)",
        "    before = next(newer, None)",
        f"    current = st.watermark // {bucket_ms}",
        "    if before is None or before != rest[0] or newest != current:",
        "        return None",
        "    prev = buckets[before]",
        "    keys = None",
        f"    {g_names}, = rest[{1 + nw}:]",
    ]
    for wi in by_window:
        kind, nb, gap = windows[wi]
        extend = [
            f"g{j} = {_EXTEND[op].format(g=f'g{j}', c=col, c1=col + 1)}"
            for j in by_window[wi]
            for _, op, col in [aggs[j]]
        ]
        roll += [
            f"    if {kept(wi, kind, nb, gap)}:",
            f"        k{wi} = rest[{1 + wi}]",
            *(f"        {x}" for x in extend),
            "    else:",
            "        if keys is None:",
            "            keys = list(buckets)",
            "            rows = list(buckets.values())",
            "            tail = len(keys) - 1",
            starts_now[wi],
            f"        k{wi} = keys[s{wi}]",  # a new start: recompute the rest
            *recompute(wi, "        ", []),
        ]
    roll.append(f"    return (newest, {', '.join(f'k{i}' for i in range(nw))}, {g_names})")

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
    for k in view.ratio_order():  # a ratio after the ratios it divides
        f = view.features[k]
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
        "_kmv_merge": _kmv_merge,
        "_kmv_rest": _kmv_rest,
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
    source = "\n".join(roll) + "\n\n\n" + "\n".join(lines) + "\n"
    filename = generated_filename(view)
    # Registered with linecache: a traceback through the generated code shows its lines.
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    exec(compile(source, filename, "exec"), scope)  # noqa: S102 - generated from a validated definition
    fn: Callable[[EntityState], list[float]] = scope["values"]
    fn.__doc__ = source  # the generated code, for whoever debugs it
    return fn


def generated_filename(view: FeatureView) -> str:
    """The stable name the generated code of a view version is compiled under."""
    return f"<myelin-view {view.ref}>"
