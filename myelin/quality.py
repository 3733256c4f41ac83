"""Outcomes joined to the inference ledger, and model quality per version, hour and cohort,
in ClickHouse SQL (the same on chdb and a server).

A model names where its outcomes come from (:class:`~myelin.models.LabelSource`, in its
provenance). :func:`outcomes_sql` gives one row per scored entity of a Predict with its
``label``; :func:`quality_sql` aggregates them per model version and hour, and optionally
per cohort (a bucket of one feature value, as served): count, positives, ROC AUC
(``arrayAUC``, equal to scikit-learn's ``roc_auc_score``, ties included), log loss (the argument
of each log floored at 1e-15), mean score, positive rate and their difference
(calibration gap), and the expected calibration error over ten score bins.
"""

from __future__ import annotations

import re

from myelin.models import LabelSource
from myelin.warehouse import DATABASE

_IDENT = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
_FEATURE = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
EPS = 1e-15


def _model(name: str) -> str:
    if not _IDENT.match(name):
        raise ValueError(f"model name {name!r} is not a plain identifier")
    return name


def outcomes_sql(model: str, source: LabelSource) -> str:
    """``request_id, row, model_version, route, ts, entity_id, score, features, label`` for
    every Predict row of ``model`` whose outcome is known."""
    inferences = f"""SELECT request_id, row, model_version, route, ts, entity_id, score, features
        FROM {DATABASE}.inferences FINAL
        WHERE model = '{_model(model)}' AND api = 'predict' AND entity_id != ''"""
    if source.kind == "event":
        # the first event of that type after the inference, by the same entity (ASOF)
        return f"""
SELECT i.request_id AS request_id, i.row AS row, i.model_version AS model_version,
       i.route AS route, i.ts AS ts, i.entity_id AS entity_id, i.score AS score,
       i.features AS features,
       toUInt8(o.event_time > i.ts
               AND o.event_time <= i.ts + INTERVAL {source.window_s} SECOND) AS label
FROM ({inferences}
      AND ts <= now64(3) - INTERVAL {source.window_s} SECOND) AS i
ASOF LEFT JOIN (SELECT entity_id, event_time FROM {DATABASE}.events FINAL
                WHERE type = '{source.event_type}' AND late = 0) AS o
  ON i.entity_id = o.entity_id AND i.ts < o.event_time"""
    return f"""
SELECT i.request_id AS request_id, i.row AS row, i.model_version AS model_version,
       i.route AS route, i.ts AS ts, i.entity_id AS entity_id, i.score AS score,
       i.features AS features, toUInt8(o.value > 0) AS label
FROM ({inferences}) AS i
INNER JOIN (SELECT JSONExtractString(data, '{source.request_field}') AS request_id,
                   argMax(JSONExtractFloat(data, '{source.value_field}'), stream_seq) AS value
            FROM {DATABASE}.events FINAL WHERE type = '{source.event_type}'
            GROUP BY request_id) AS o
  ON o.request_id = i.request_id"""


def quality_sql(
    model: str,
    source: LabelSource,
    *,
    cohort_feature: str = "",
    cohort_width: float = 1.0,
) -> str:
    """Quality per model version and hour (and per cohort: the served value of
    ``cohort_feature`` in buckets of ``cohort_width``)."""
    if cohort_feature and not _FEATURE.match(cohort_feature):
        raise ValueError(f"feature {cohort_feature!r} is not a plain identifier")
    if not cohort_width > 0:
        raise ValueError("the cohort width must be positive")
    cohort = (
        f"floor(features['{cohort_feature}'] / {float(cohort_width)!r}) * {float(cohort_width)!r}"
        if cohort_feature
        else "0"
    )
    return f"""
SELECT model_version, toDateTime64(toStartOfHour(ts), 3, 'UTC') AS hour, {cohort} AS cohort,
       count() AS n, sum(label) AS positives,
       arrayAUC(groupArray(score), groupArray(label)) AS auc,
       avg(-(label * log(greatest(score, {EPS})) +
             (1 - label) * log(greatest(1 - score, {EPS})))) AS logloss,
       avg(score) AS mean_score, avg(label) AS positive_rate,
       mean_score - positive_rate AS calibration_gap,
       arraySum(arrayMap(x -> abs(x), sumMap([least(toUInt8(floor(score * 10)), 9)],
                                             [score - label]).2)) / n AS ece
FROM ({outcomes_sql(model, source)}) AS o
GROUP BY model_version, hour, cohort
ORDER BY model_version, hour, cohort"""


def agreement_sql(model: str, *, threshold: float = 0.5, hours: int = 24) -> str:
    """Agreement of each pair (served version, shadow version) of ``model`` per hour over
    the last ``hours``: rows compared, mean and largest absolute score difference, score
    correlation, and decision flips (one score at or over ``threshold``, the other under),
    from the ledger rows a shadow scored beside the version that answered."""
    if not 0.0 < threshold < 1.0:
        raise ValueError("the decision threshold is in (0, 1)")
    if not 0 < hours <= 24 * 366:
        raise ValueError("hours is between 1 and 8784")
    t = float(threshold)
    return f"""
SELECT s.model_version AS served_version, h.model_version AS shadow_version,
       toDateTime64(toStartOfHour(s.ts), 3, 'UTC') AS hour,
       count() AS n,
       avg(abs(h.score - s.score)) AS mean_abs_diff,
       max(abs(h.score - s.score)) AS max_abs_diff,
       corr(s.score, h.score) AS correlation,
       countIf((s.score >= {t!r}) != (h.score >= {t!r})) AS flips,
       flips / n AS flip_rate
FROM (SELECT request_id, row, model_version, ts, score FROM {DATABASE}.inferences FINAL
      WHERE model = '{_model(model)}' AND api = 'predict' AND route != 'shadow'
        AND ts >= now64(3) - INTERVAL {int(hours)} HOUR) AS s
INNER JOIN (SELECT request_id, row, model_version, score FROM {DATABASE}.inferences FINAL
            WHERE model = '{_model(model)}' AND api = 'predict' AND route = 'shadow'
              AND ts >= now64(3) - INTERVAL {int(hours)} HOUR) AS h
  ON h.request_id = s.request_id AND h.row = s.row
GROUP BY served_version, shadow_version, hour
ORDER BY served_version, shadow_version, hour"""
