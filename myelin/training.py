"""Point-in-time correct training sets in ClickHouse SQL (ASOF JOIN).

For every label row ``(entity_id, ts, label)`` the feature values are the newest ones
whose ``as_of`` is strictly before ``ts``: no value from the label's future leaks in.
An entity with no earlier values reads 0 (the same imputation inference uses).
"""

from __future__ import annotations

import re

from myelin.warehouse import DATABASE

_IDENT = re.compile(r"^[a-z][a-z0-9_]{0,63}$")


def clicked_impressions_sql(click_window_s: int = 60) -> str:
    """Labels: each impression, and whether the same user clicked the same item soon after."""
    return f"""
    SELECT i.entity_id AS entity_id, i.event_time AS ts,
           toUInt8(max(c.click_time >= i.event_time
                       AND c.click_time <= i.event_time + INTERVAL {int(click_window_s)} SECOND)) AS label
    FROM (SELECT event_id, entity_id, event_time, JSONExtractString(data, 'item_id') AS item
          FROM {DATABASE}.events FINAL WHERE type = 'impression' AND late = 0) AS i
    LEFT JOIN (SELECT entity_id, JSONExtractString(data, 'item_id') AS item, event_time AS click_time
               FROM {DATABASE}.events FINAL WHERE type = 'click') AS c
      ON c.entity_id = i.entity_id AND c.item = i.item
    GROUP BY i.event_id, i.entity_id, i.event_time"""


_HASH = re.compile(r"^[0-9a-f]{1,64}$")


def training_set_sql(view: str, features: list[str], labels_sql: str, version: str = "") -> str:
    """``version``: the view version (content hash) to read; '' reads every version, which
    is only right while the view has one."""
    if not _IDENT.match(view) or not all(_IDENT.match(f) for f in features):
        raise ValueError("view and feature names must be plain identifiers")
    if version and not _HASH.match(version):
        raise ValueError("a view version is a hex content hash")
    pinned = f" AND view_hash = '{version}'" if version else ""
    cols = ",\n       ".join(f"f.values['{f}'] AS {f}" for f in features)
    return f"""
SELECT l.entity_id AS entity_id, l.ts AS ts, l.label AS label, f.as_of AS features_as_of,
       {cols}
FROM ({labels_sql}) AS l
ASOF LEFT JOIN (SELECT entity_id, as_of, values FROM {DATABASE}.feature_values FINAL
                WHERE view = '{view}'{pinned}) AS f
  ON l.entity_id = f.entity_id AND l.ts > f.as_of
ORDER BY ts, entity_id"""
