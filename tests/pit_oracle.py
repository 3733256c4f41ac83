"""A point-in-time oracle for feature views, from first principles (pandas and numpy).

It shares no code with ``services.features``: it reads a view definition in its JSON form
(what ``services.features.views.view_doc`` returns) and raw events, and computes the
feature rows the pipeline must write and the training set a point-in-time join must
return. The rules, as the engine implements them:

- Stream order is ``seq`` (stream sequence x 1000 + index in the message); only events
  of the view's sources count. Sequences are unique (a repeated one is a redelivered
  message); an event id may repeat (the same event sent again: same entity, type, time).
- A partition's watermark is the newest event time among the earlier source events of
  that partition that were not late *by it* (an event late only by its entity's horizon,
  or a repeat, still moves it); it starts at 0. An event older than its partition's
  watermark minus ``allowed_lateness_s`` is late.
- Buckets are ``event_time // (bucket_s * 1000)``. An entity's watermark is the newest
  event time among its applied events (0 before the first). An event is also late when
  its bucket <= ``max(watermark, event_time) // bucket_ms - horizon``, the horizon being
  the longest window in buckets. Late events are not applied. A copy of an event id
  already applied (and not late itself) is a duplicate: not applied either.
- Each applied event writes one row: ``as_of`` = the entity's watermark after it, and the
  values over every applied event of the entity up to it (itself included), with the
  current bucket ``as_of // bucket_ms``. Windows (in buckets, ``nb = window_s /
  bucket_s``): sliding = (current - nb, current]; tumbling = [current // nb * nb,
  current]; session = from the current bucket back over the entity's active buckets (a
  bucket with any applied source event) while consecutive ones are at most ``gap_s /
  bucket_s`` apart and within nb of the current one.
- count counts events; the others skip a null field (NaN or None here): sum (0 without
  values), mean, min, max, last, stddev (NaN without values), distinct (exact below 64
  values, else the KMV estimate over CRC-32 hashes; 0 without values), ratio (0 when the
  denominator is 0; ratios of ratios in dependency order).
- A label ``(entity, ts)`` reads the row of the entity's newest applied event (greatest
  seq) whose ``as_of`` < ts; with none, every feature reads 0 and ``features_as_of`` 0.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd  # type: ignore[import-untyped]

KMV_K = 64  # a distinct count is exact below this many values
COUNT_KINDS = ("count",)  # whole numbers in a float column: compared exactly

I64 = npt.NDArray[np.int64]
F64 = npt.NDArray[np.float64]


@dataclass(frozen=True)
class Agg:
    name: str
    kind: str
    window_s: int = 0
    source: str = ""
    field: str = ""
    numerator: str = ""
    denominator: str = ""
    window: str = "sliding"
    gap_s: int = 0


@dataclass(frozen=True)
class View:
    name: str
    sources: tuple[str, ...]
    features: tuple[Agg, ...]
    bucket_s: int
    allowed_lateness_s: int

    @classmethod
    def from_doc(cls, doc: Mapping[str, Any]) -> View:
        return cls(
            name=str(doc["name"]),
            sources=tuple(doc["sources"]),
            features=tuple(
                Agg(**{k: v for k, v in f.items() if k in Agg.__dataclass_fields__})
                for f in doc["features"]
            ),
            bucket_s=int(doc.get("bucket_s", 60)),
            allowed_lateness_s=int(doc.get("allowed_lateness_s", 3600)),
        )

    @property
    def names(self) -> list[str]:
        return [f.name for f in self.features]

    @property
    def bucket_ms(self) -> int:
        return self.bucket_s * 1000

    @property
    def horizon(self) -> int:
        return max(f.window_s for f in self.features if f.kind != "ratio") // self.bucket_s


def outcomes(events: pd.DataFrame, view: View) -> pd.DataFrame:
    """The view's source events in stream order, with ``partition_late``, ``entity_late``,
    ``duplicate``, ``applied`` and ``as_of`` (the entity's watermark after the event; -1
    if not applied).

    ``events``: one row per event with ``entity_id``, ``type``, ``event_time`` (ms),
    ``seq``, ``partition``, the payload fields the view reads and, optionally,
    ``event_id``."""
    ev = events[events["type"].isin(view.sources)].sort_values("seq", kind="stable")
    ev = ev.reset_index(drop=True)
    if ev["seq"].duplicated().any():
        raise ValueError("sequences must be unique: a repeated one is a redelivery")
    t = ev["event_time"].astype("int64")
    part = ev["partition"]
    # A running max over every earlier event of the partition: an event late by its
    # partition is older than the watermark then, so counting it changes nothing.
    p_wm = t.groupby(part).cummax().groupby(part).shift(1).fillna(0).astype("int64")
    partition_late = t < p_wm - view.allowed_lateness_s * 1000
    # Likewise an event late by its entity's horizon is older than the entity's watermark
    # (its bucket is a horizon behind max(watermark, its time)), so the watermark before
    # each event is a running max over the entity's earlier events not late by partition.
    ent = ev["entity_id"]
    seen = t.where(~partition_late, 0)
    e_wm = seen.groupby(ent).cummax().groupby(ent).shift(1).fillna(0).astype("int64")
    after = np.maximum(e_wm, t)
    entity_late = ~partition_late & (t // view.bucket_ms <= after // view.bucket_ms - view.horizon)
    late = partition_late | entity_late
    # Repeats of an event id: the first copy that is not late is applied, later ones that
    # are not late either are duplicates. A copy has its original's time, never above the
    # watermark, so the running maxima above need no correction.
    duplicate = pd.Series(False, index=ev.index)
    if "event_id" in ev.columns:
        copies = ev.groupby("event_id")[["entity_id", "type", "event_time"]].nunique()
        if (copies > 1).any().any():
            raise ValueError("copies of an event id differ in entity, type or time")
        duplicate = ~late & ev["event_id"].where(~late).duplicated(keep="first")
    applied = ~late & ~duplicate
    return ev.assign(
        partition_late=partition_late,
        entity_late=entity_late,
        duplicate=duplicate,
        applied=applied,
        as_of=after.where(applied, -1),
    )


def _distinct(hashes: npt.NDArray[np.int64]) -> float:
    u = np.unique(hashes)  # sorted
    if len(u) < KMV_K:
        return float(len(u))
    return float((KMV_K - 1) / ((int(u[KMV_K - 1]) + 1) / 2**32))


def _session_start(active: I64, current: int, gap: int, nb: int) -> int:
    """The first bucket of the session ending at ``current``: ``active`` holds the
    entity's active buckets up to ``current`` (which is one of them), ascending."""
    start = prev = current
    for b in active[::-1][1:].tolist():
        if prev - b > gap or current - b >= nb:
            break
        start = prev = b
    return start


class _Entity:
    """One entity's applied events in stream order, as arrays."""

    def __init__(self, ev: pd.DataFrame, view: View) -> None:
        self.seq: I64 = ev["seq"].to_numpy(np.int64)
        self.time: I64 = ev["event_time"].to_numpy(np.int64)
        self.as_of: I64 = ev["as_of"].to_numpy(np.int64)
        self.bucket: I64 = self.time // view.bucket_ms
        self.type: npt.NDArray[np.str_] = ev["type"].to_numpy(str)
        self.num: dict[str, F64] = {}  # NaN: null
        self.hashes: dict[str, npt.NDArray[np.int64]] = {}  # -1: null
        for f in view.features:
            if f.kind == "distinct" and f.field not in self.hashes:
                self.hashes[f.field] = np.array(
                    [-1 if _null(v) else zlib.crc32(str(v).encode()) for v in ev[f.field]],
                    np.int64,
                )
            elif f.field and f.kind not in ("ratio", "distinct") and f.field not in self.num:
                self.num[f.field] = ev[f.field].to_numpy(np.float64)

    def values(self, k: int, view: View) -> list[float]:
        """The feature values after the first ``k + 1`` applied events."""
        n = k + 1
        current = int(self.as_of[k]) // view.bucket_ms
        buckets = self.bucket[:n]
        windows: dict[tuple[str, int, int], npt.NDArray[np.bool_]] = {}
        out: dict[str, float] = {}
        for f in view.features:
            if f.kind == "ratio":
                continue
            nb, gap = f.window_s // view.bucket_s, f.gap_s // view.bucket_s
            key = (f.window, nb, gap)
            if key not in windows:
                if f.window == "sliding":
                    windows[key] = buckets > current - nb
                elif f.window == "tumbling":
                    windows[key] = buckets >= (current // nb) * nb
                else:
                    start = _session_start(np.unique(buckets), current, gap, nb)
                    windows[key] = buckets >= start
            sel = windows[key] & (self.type[:n] == f.source)
            out[f.name] = _aggregate(f, self, sel, n)
        ratios = [f for f in view.features if f.kind == "ratio"]
        while ratios:  # a ratio may divide ratios declared after it
            ready = [f for f in ratios if f.numerator in out and f.denominator in out]
            if not ready:
                raise ValueError("ratios divide each other in a cycle")
            for f in ready:
                den = out[f.denominator]
                out[f.name] = out[f.numerator] / den if den else 0.0
            ratios = [f for f in ratios if f not in ready]
        return [out[name] for name in view.names]


def _null(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def _aggregate(f: Agg, e: _Entity, sel: npt.NDArray[np.bool_], n: int) -> float:
    if f.kind == "count":
        return float(sel.sum())
    if f.kind == "distinct":
        h = e.hashes[f.field][:n][sel]
        return _distinct(h[h >= 0])
    present = sel & ~np.isnan(e.num[f.field][:n])
    x = e.num[f.field][:n][present]
    count = len(x)
    if f.kind == "sum":
        return float(x.sum()) if count else 0.0
    if not count:
        return math.nan
    if f.kind == "mean":
        return float(x.sum() / count)
    if f.kind == "min":
        return float(x.min())
    if f.kind == "max":
        return float(x.max())
    if f.kind == "stddev":
        return float(np.sqrt(np.mean((x - x.mean()) ** 2)))
    if f.kind == "last":
        # the newest event time; on a tie, the one applied last (greatest seq)
        times = e.time[:n][present]
        return float(x[np.flatnonzero(times == times.max())[-1]])
    raise ValueError(f"unknown aggregation {f.kind!r}")


def feature_rows(events: pd.DataFrame, view: View) -> pd.DataFrame:
    """One row per applied event: ``entity_id``, ``as_of``, ``seq`` and the features,
    in stream order."""
    ev = outcomes(events, view)
    applied = ev[ev["applied"]]
    records: list[tuple[Any, ...]] = []
    for entity, group in applied.groupby("entity_id", sort=False):
        e = _Entity(group, view)
        for k in range(len(group)):
            records.append((entity, int(e.as_of[k]), int(e.seq[k]), *e.values(k, view)))
    rows = pd.DataFrame.from_records(records, columns=["entity_id", "as_of", "seq", *view.names])
    return rows.sort_values("seq", kind="stable").reset_index(drop=True)


def point_in_time(rows: pd.DataFrame, labels: pd.DataFrame, view: View) -> pd.DataFrame:
    """``labels`` (``entity_id``, ``ts`` in ms, ``label``) with ``features_as_of`` (ms) and
    the features, ordered by (ts, entity_id, label). ``rows``: from :func:`feature_rows`."""
    by_entity = {
        entity: (g["as_of"].to_numpy(np.int64), g["seq"].to_numpy(np.int64), g[view.names])
        for entity, g in rows.groupby("entity_id", sort=False)
    }
    zeros = [0.0] * len(view.names)
    out: list[tuple[Any, ...]] = []
    for entity, ts, label in labels[["entity_id", "ts", "label"]].itertuples(index=False):
        found = by_entity.get(entity)
        if found is None:
            out.append((entity, ts, label, 0, *zeros))
            continue
        as_of, seq, values = found
        earlier = np.flatnonzero(as_of < ts)
        if len(earlier) == 0:
            out.append((entity, ts, label, 0, *zeros))
            continue
        i = earlier[np.argmax(seq[earlier])]  # the newest event, not the newest as_of
        out.append((entity, ts, label, int(as_of[i]), *values.iloc[i].tolist()))
    result = pd.DataFrame.from_records(
        out, columns=["entity_id", "ts", "label", "features_as_of", *view.names]
    )
    return result.sort_values(["ts", "entity_id", "label"], kind="stable").reset_index(drop=True)


def clicked_impressions(events: pd.DataFrame, view: View, click_window_s: int) -> pd.DataFrame:
    """Labels: each impression the view applied, 1 when the same user clicked the same item
    (any click, late or not) within ``click_window_s`` after it. Raw history keeps, of an
    event's copies, the first one on the stream (the one that counted), so an impression
    applied once is labelled even if a copy of it came again too late."""
    ev = outcomes(events, view)
    imps = ev[ev["type"] == "impression"]
    imps = imps[imps["applied"]]
    clicks = events[events["type"] == "click"]
    by_key: dict[tuple[str, str], I64] = {
        (str(k[0]), str(k[1])): np.sort(g["event_time"].to_numpy(np.int64))
        for k, g in clicks.groupby(["entity_id", "item_id"], sort=False)
    }
    labels: list[int] = []
    for entity, item, t in imps[["entity_id", "item_id", "event_time"]].itertuples(index=False):
        times = by_key.get((str(entity), str(item)))
        hit = times is not None and bool(
            ((times >= t) & (times <= t + click_window_s * 1000)).any()
        )
        labels.append(int(hit))
    return pd.DataFrame(
        {
            "entity_id": imps["entity_id"].to_numpy(),
            "ts": imps["event_time"].to_numpy(np.int64),
            "label": labels,
        }
    )
