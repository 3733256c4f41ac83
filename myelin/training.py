"""Point-in-time correct training sets in ClickHouse SQL (ASOF JOIN).

For every label row ``(entity_id, ts, label)`` the feature values are those of the
entity's newest feature row (greatest ``stream_seq``) whose ``as_of`` is strictly before
``ts``: no value from the label's future leaks in. An entity with no earlier row reads 0
for every feature (the same imputation inference uses) and ``features_as_of`` reads the
epoch. The same query on the same data returns the same rows in the same order.

A training set can be bounded by a stream sequence (``max_seq``, a sequence of the EVENTS
stream): it then reads only what the platform knew once that message was applied, so
re-running it later, after more events arrived, returns the same rows. Raw events and
feature rows carry the *event* sequence, ``stream sequence x 1000 + index in the
message`` (:data:`EVENT_SEQ_STRIDE`, as the features pipeline and the warehouse's drains
number them), so the bound keeps event sequences below ``(max_seq + 1) x 1000``.

Labels are built by named builders (:data:`LABEL_BUILDERS`), so a model can record how its
labels were made (``"clicked_impressions:60"``) and a retrain can rebuild them, bounded.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from myelin.errors import MyelinError
from myelin.warehouse import DATABASE

#: event sequence = EVENTS stream sequence x this + index in the message (the features
#: pipeline's and the warehouse drains' ``SEQ_STRIDE``)
EVENT_SEQ_STRIDE = 1000

_IDENT = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
_HASH = re.compile(r"^[0-9a-f]{1,64}$")

# The ASOF key packs (as_of in ms, stream_seq) into one Decimal(38, 0): as_of x 10^20 +
# stream_seq. stream_seq is a UInt64 (< 1.9e19 < 10^20), so the key orders rows like the
# pair. Joined on as_of alone, rows sharing an as_of (events in one millisecond, or
# out-of-order ones that did not move the watermark) tie, and the ASOF join, which sorts
# its keys with an unstable sort, finds any of them; on this key, the newest. Decimal128
# has been an ASOF key type far longer than 128-bit integers (older servers refuse
# UInt128). The key costs next to nothing; collapsing ties with GROUP BY and argMax
# before the join made it 1.7x (tuple of features) to 4.5x (whole map) slower.
_SEQ_SPAN = "toDecimal128('100000000000000000000', 0)"
_ROW_KEY = (
    f"toDecimal128(toUnixTimestamp64Milli(as_of), 0) * {_SEQ_SPAN} + toDecimal128(stream_seq, 0)"
)
# A label's key is its ts rounded *up* to the millisecond, x 10^20: then label key > row
# key exactly when ts > as_of, also for labels finer than a millisecond (rounding down
# would hide from a label at x.5 ms the row of x ms).
_LABEL_MS = "toUnixTimestamp64Milli(toDateTime64(ts, 3)) + (toDateTime64(ts, 3) < ts)"
_LABEL_KEY = f"toDecimal128({_LABEL_MS}, 0) * {_SEQ_SPAN}"


class LabelSpecError(MyelinError):
    code = "label_spec_error"


def _seq_limit(max_seq: int | None) -> int | None:
    """The first event sequence past EVENTS stream sequence ``max_seq`` (None: no bound)."""
    if max_seq is None:
        return None
    if max_seq < 0:
        raise ValueError(f"a stream sequence bound is >= 0, got {max_seq}")
    return (int(max_seq) + 1) * EVENT_SEQ_STRIDE


def clicked_impressions_sql(click_window_s: int = 60, *, max_seq: int | None = None) -> str:
    """Labels: each impression, and whether the same user clicked the same item soon after.
    One row per impression, ordered by (ts, entity_id, impression event id).

    ``max_seq``: only events up to this EVENTS stream sequence count, clicks included; and
    only impressions whose click window had closed by then (the newest event time up to
    the bound, the bound's event-time watermark), so that an impression whose click came
    after the bound is left out rather than labelled 0."""
    window = int(click_window_s)
    limit = _seq_limit(max_seq)
    bounded = f" AND stream_seq < {limit}" if limit is not None else ""
    mature = (
        f"""
            AND event_time + INTERVAL {window} SECOND <=
                (SELECT max(event_time) FROM {DATABASE}.events WHERE stream_seq < {limit})"""
        if limit is not None
        else ""
    )
    return f"""
    SELECT i.entity_id AS entity_id, i.event_time AS ts,
           toUInt8(max(c.click_time >= i.event_time
                       AND c.click_time <= i.event_time + INTERVAL {window} SECOND)) AS label
    FROM (SELECT event_id, entity_id, event_time, JSONExtractString(data, 'item_id') AS item
          FROM {DATABASE}.events FINAL WHERE type = 'impression' AND late = 0{bounded}{mature}) AS i
    LEFT JOIN (SELECT entity_id, JSONExtractString(data, 'item_id') AS item, event_time AS click_time
               FROM {DATABASE}.events FINAL WHERE type = 'click'{bounded}) AS c
      ON c.entity_id = i.entity_id AND c.item = i.item
    GROUP BY i.event_id, i.entity_id, i.event_time
    ORDER BY ts, entity_id, i.event_id"""


def _clicked_impressions(arg: str, max_seq: int | None) -> str:
    return clicked_impressions_sql(int(arg) if arg else 60, max_seq=max_seq)


#: ``name`` -> (argument, max_seq) -> labels SQL. A model records its builder as
#: ``"name:argument"`` (``ModelVersion.labels["training_labels"]``).
LABEL_BUILDERS: dict[str, Callable[[str, int | None], str]] = {
    "clicked_impressions": _clicked_impressions,  # argument: the click window in seconds
}


def labels_spec(name: str, argument: object = "") -> str:
    """``labels_spec("clicked_impressions", 60)`` -> ``"clicked_impressions:60"``."""
    spec = f"{name}:{argument}" if argument != "" else name
    labels_sql(spec)  # refuse what cannot be rebuilt now, not at the first retrain
    return spec


def labels_sql(spec: str, max_seq: int | None = None) -> str:
    """The labels SQL a spec (``"clicked_impressions:60"``) names, bounded by ``max_seq``."""
    name, _, arg = spec.partition(":")
    builder = LABEL_BUILDERS.get(name)
    if builder is None:
        raise LabelSpecError(
            f"unknown training labels {spec!r}: use one of {sorted(LABEL_BUILDERS)} "
            "as NAME:ARGUMENT (e.g. clicked_impressions:60)",
            spec=spec,
        )
    try:
        return builder(arg, max_seq)
    except ValueError as exc:
        raise LabelSpecError(f"training labels {spec!r}: {exc}", spec=spec) from None


def training_set_sql(
    view: str,
    features: list[str],
    labels_sql: str,
    version: str = "",
    *,
    max_seq: int | None = None,
) -> str:
    """``labels_sql`` yields ``entity_id``, ``ts`` (DateTime or DateTime64) and ``label``.

    ``version``: the view version (content hash) to read; '' reads every version, which
    is only right while the view has one (rows of several versions for one event are then
    resolved to the greatest hash, so that the result is at least reproducible).

    Output rows are ordered by (ts, entity_id, label): the features are a function of
    (entity_id, ts), so rows equal in those three are equal in every column and the order
    is total; two runs give identical bytes.

    ``max_seq``: feature rows of events up to this EVENTS stream sequence only (bound the
    labels with the same value: :func:`labels_sql`); None reads every row."""
    if not _IDENT.match(view) or not all(_IDENT.match(f) for f in features):
        raise ValueError("view and feature names must be plain identifiers")
    if version and not _HASH.match(version):
        raise ValueError("a view version is a hex content hash")
    limit = _seq_limit(max_seq)
    bounded = f" AND stream_seq < {limit}" if limit is not None else ""
    if version:
        rows = f"""SELECT entity_id, as_of, values, {_ROW_KEY} AS pit_key
                FROM {DATABASE}.feature_values FINAL
                WHERE view = '{view}' AND view_hash = '{version}'{bounded}"""
    else:
        # one event's rows of several versions share (entity_id, as_of, stream_seq): keep one
        rows = f"""SELECT entity_id, as_of, values, {_ROW_KEY} AS pit_key
                FROM {DATABASE}.feature_values FINAL
                WHERE view = '{view}'{bounded}
                ORDER BY entity_id, as_of, stream_seq, view_hash DESC
                LIMIT 1 BY entity_id, as_of, stream_seq"""
    cols = ",\n       ".join(f"f.values['{f}'] AS {f}" for f in features)
    return f"""
SELECT l.entity_id AS entity_id, l.ts AS ts, l.label AS label, f.as_of AS features_as_of,
       {cols}
FROM (SELECT entity_id, ts, label, {_LABEL_KEY} AS pit_key FROM ({labels_sql})) AS l
ASOF LEFT JOIN ({rows}) AS f
  ON l.entity_id = f.entity_id AND l.pit_key > f.pit_key
ORDER BY ts, entity_id, label"""
