"""The pure parts of the backtest (myelin/backtest.py): metrics against scikit-learn, the
candidate's feature matrix against a row-by-row reference, chunk planning, times, model
references, the report's text and the errors raised before any query."""

from __future__ import annotations

import math
from datetime import UTC, datetime

import numpy as np
import pyarrow as pa
import pytest
from sklearn.metrics import log_loss, roc_auc_score

from myelin.backtest import (
    BacktestReport,
    BadModelRef,
    BadTime,
    CandidateUnusable,
    GroupResult,
    NotFeatureAware,
    backtest_sql,
    feature_matrix,
    format_report,
    metrics,
    parse_model_ref,
    parse_time,
    plan_chunks,
    run_backtest,
    served_counts_sql,
)
from myelin.models import LabelSource, ModelVersion, Provenance

NOW = 1_780_000_000_000
SOURCE = LabelSource(kind="event", event_type="click", window_s=600)


def _ece(s: np.ndarray, y: np.ndarray) -> float:
    total = 0.0
    for b in range(10):
        lo, hi = b / 10, (b + 1) / 10
        inside = [
            (p, lab) for p, lab in zip(s, y, strict=True) if lo <= p < hi or (b == 9 and p == 1)
        ]
        total += abs(sum(p - lab for p, lab in inside))
    return total / len(s)


@pytest.mark.parametrize("seed", range(6))
def test_metrics_match_sklearn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(20, 2000))
    s = rng.uniform(0.001, 0.999, n)
    if seed % 2:
        s = np.round(s, 2)  # many ties: AUC must average them as sklearn does
    y = (rng.uniform(size=n) < s).astype(int)
    m = metrics(s, y)
    assert (m["n"], m["positives"]) == (n, int(y.sum()))
    assert m["auc"] == pytest.approx(roc_auc_score(y, s), rel=1e-9, abs=1e-12)
    assert m["logloss"] == pytest.approx(log_loss(y, s, labels=[0, 1]), rel=1e-9, abs=1e-12)
    assert m["mean_score"] == pytest.approx(s.mean(), rel=1e-12)
    assert m["positive_rate"] == pytest.approx(y.mean(), rel=1e-12)
    assert m["ece"] == pytest.approx(_ece(s, y), rel=1e-9, abs=1e-12)


def test_auc_of_a_perfect_an_inverted_and_an_all_tied_ranking() -> None:
    y = [0, 0, 1, 1]
    assert metrics([0.1, 0.2, 0.8, 0.9], y)["auc"] == 1.0
    assert metrics([0.9, 0.8, 0.2, 0.1], y)["auc"] == 0.0
    assert metrics([0.5, 0.5, 0.5, 0.5], y)["auc"] == 0.5


def test_one_class_has_no_auc_and_no_rows_have_no_metrics() -> None:
    one = metrics([0.2, 0.7], [1, 1])
    assert math.isnan(one["auc"]) and one["positives"] == 2 and one["positive_rate"] == 1.0
    none = metrics([], [])
    assert none["n"] == 0 and all(math.isnan(none[k]) for k in ("auc", "logloss", "ece"))
    with pytest.raises(ValueError, match="3 scores but 2 labels"):
        metrics([0.1, 0.2, 0.3], [0, 1])


def test_logloss_floors_each_log_at_1e_15_as_quality_sql_does() -> None:
    m = metrics([0.0, 1.0, 0.0, 1.0], [1, 0, 0, 1])
    assert m["logloss"] == pytest.approx(-math.log(1e-15) / 2, rel=1e-9)
    assert m["ece"] == pytest.approx(0.5)  # (|0 - 1 + 0 - 0| + |1 - 0 + 1 - 1|) / 4


def test_feature_matrix_in_the_candidates_order_imputes_like_serving() -> None:
    features = ["c", "a", "b"]
    rows = [
        {"a": 1.5, "b": 2.0, "c": 3.0},
        {"b": math.nan, "zz": 9.0},  # NaN and an absent key -> 0; an unread key is ignored
        {},
        {"a": math.inf, "c": -math.inf, "b": 1e300},  # infinities and float32 overflow -> 0
        {"c": -1.25, "a": 0.0},
    ]
    col = pa.array(
        [list(r.items()) for r in [{"x": 1.0}, *rows]], pa.map_(pa.string(), pa.float64())
    )[1:]  # a sliced array: offsets do not start at 0
    x, missing = feature_matrix(pa.chunked_array([col[:2], col[2:]]), features)
    with np.errstate(over="ignore"):  # serving's cast: 1e300 -> inf -> 0
        want = np.array([[r.get(f, math.nan) for f in features] for r in rows], dtype=np.float32)
    want = np.nan_to_num(want, nan=0.0, posinf=0.0, neginf=0.0)
    assert x.dtype == np.float32 and x.shape == (5, 3)
    assert np.array_equal(x, want)
    assert missing.tolist() == [2, 2, 2]  # c, a, b: absent from rows 1-2, 1-2, 2 and 4


def test_chunks_cover_the_period_and_cut_at_bucket_starts() -> None:
    counts = [(0, 30), (1, 30), (3, 50), (4, 10), (9, 200), (10, 1)]
    spans = plan_chunks(counts, 1000, 2100, 100, chunk_rows=60)
    assert spans == [(1000, 1300, 60), (1300, 1900, 60), (1900, 2000, 200), (2000, 2100, 1)]
    assert plan_chunks([], 5, 10, 1, 60) == [(5, 10, 0)]
    assert plan_chunks([(0, 500)], 5, 10, 1, 60) == [(5, 10, 500)]


def test_sql_filters_the_period_and_shadow_rows_and_refuses_odd_names() -> None:
    sql = backtest_sql("ctr", SOURCE, 1000, 2000)
    assert "ts >= fromUnixTimestamp64Milli(toInt64(1000), 'UTC')" in sql
    assert "ts < fromUnixTimestamp64Milli(toInt64(2000), 'UTC')" in sql
    assert "route != 'shadow'" in sql and sql.rstrip().endswith(
        "ORDER BY ts, request_id, route, row"
    )
    for bad in ("ctr'; DROP TABLE x --", "Ctr"):
        with pytest.raises(ValueError, match="plain identifier"):
            backtest_sql(bad, SOURCE, 0, 1)
        with pytest.raises(ValueError, match="plain identifier"):
            served_counts_sql(bad, 0, 1, 1)


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("now", NOW),
        ("-2h", NOW - 2 * 3_600_000),
        ("-30m", NOW - 30 * 60_000),
        ("-7d", NOW - 7 * 86_400_000),
        ("-45s", NOW - 45_000),
        ("-1.5h", NOW - 5_400_000),
        ("now-1w", NOW - 7 * 86_400_000),
        (" -2H ", NOW - 2 * 3_600_000),
        ("2026-05-01T10:00:00Z", int(datetime(2026, 5, 1, 10, tzinfo=UTC).timestamp() * 1000)),
        ("2026-05-01T10:00:00", int(datetime(2026, 5, 1, 10, tzinfo=UTC).timestamp() * 1000)),
        ("2026-05-01T12:00:00+02:00", int(datetime(2026, 5, 1, 10, tzinfo=UTC).timestamp() * 1000)),
        (
            "2026-05-01T10:00:00.250Z",
            int(datetime(2026, 5, 1, 10, tzinfo=UTC).timestamp() * 1000) + 250,
        ),
        ("2026-05-01", int(datetime(2026, 5, 1, tzinfo=UTC).timestamp() * 1000)),
        ("1700000000123", 1_700_000_000_123),
    ],
)
def test_parse_time(text: str, want: int) -> None:
    assert parse_time(text, NOW) == want


@pytest.mark.parametrize(
    "text", ["", "yesterday", "-2x", "2h", "+2h", "-h", "2026-13-01", "now+1d"]
)
def test_parse_time_refuses_what_is_not_a_time(text: str) -> None:
    with pytest.raises(BadTime, match="ISO 8601"):
        parse_time(text, NOW)


def test_model_references() -> None:
    assert parse_model_ref("ctr@3") == ("ctr", "3")
    assert parse_model_ref("ctr@v12") == ("ctr", "12")
    assert parse_model_ref("ctr@champion") == ("ctr", "champion")
    for bad in ("ctr", "ctr@", "@3", "CTR@3", "c tr@3"):
        with pytest.raises(BadModelRef):
            parse_model_ref(bad)


def _report(**over: object) -> BacktestReport:
    m = metrics([0.1, 0.8, 0.6, 0.3], [0, 1, 1, 0])
    c = metrics([0.2, 0.9, 0.4, 0.3], [0, 1, 1, 0])
    base: dict[str, object] = {
        "model": "ctr",
        "candidate_version": 3,
        "t_from_ms": NOW - 3_600_000,
        "t_to_ms": NOW,
        "source": SOURCE,
        "rows": 4,
        "served_rows": 5,
        "groups": (GroupResult("1", "champion", m, c),),
        "served": m,
        "candidate": c,
        "features": ("a", "b"),
        "judged_to_ms": NOW,
    }
    return BacktestReport(**{**base, **over})  # type: ignore[arg-type]


def test_format_report_has_a_row_per_served_group_the_candidate_and_the_comparison() -> None:
    text = format_report(_report(warnings=("ctr v3 reads features ...",)))
    lines = text.splitlines()
    assert lines[0] == "backtest of ctr v3 on 2026-05-28T19:26:40Z .. 2026-05-28T20:26:40Z"
    assert "4 judged rows of 5 served" in lines[1]
    header = next(i for i, line in enumerate(lines) if line.startswith("model"))
    assert lines[header].split() == [
        "model",
        "route",
        "n",
        "pos",
        "auc",
        "logloss",
        "mean",
        "rate",
        "ece",
    ]
    assert lines[header + 1].split()[:5] == ["v1", "champion", "4", "2", "1.000"]
    assert lines[header + 2].split()[:6] == ["candidate", "v3", "same", "rows", "4", "2"]
    assert lines[header + 4].startswith("candidate v3")
    widths = {len(line) for line in lines[header : header + 5]}
    assert len(widths) == 1  # fixed width
    assert "same rows: candidate v3 vs served: auc +0.000 (1.000 vs 1.000)" in text
    assert lines[-1] == "warning: ctr v3 reads features ..."


def test_format_report_says_when_the_label_window_cuts_the_period() -> None:
    text = format_report(_report(judged_to_ms=NOW - 600_000))
    assert "outcomes are known only for inferences before about 2026-05-28T20:16:40Z" in text


async def _never(sql: str) -> pa.Table:
    raise AssertionError(f"no query expected, got {sql}")


def _mv(features: list[str]) -> ModelVersion:
    return ModelVersion(
        name="ctr",
        version=3,
        artifact="ctr/v3.onnx",
        sha256="",
        size=0,
        created_ms=0,
        provenance=Provenance(features=features),
    )


async def test_a_candidate_without_a_feature_list_is_not_feature_aware() -> None:
    with pytest.raises(NotFeatureAware, match=r"ctr v3 lists no input features"):
        await run_backtest(_never, b"", _mv([]), SOURCE, 0, 1)


async def test_an_empty_period_or_an_unloadable_model_fails_before_reading() -> None:
    with pytest.raises(BadTime, match="empty"):
        await run_backtest(_never, b"", _mv(["a"]), SOURCE, 5, 5)
    with pytest.raises(CandidateUnusable, match="cannot load"):
        await run_backtest(_never, b"not onnx", _mv(["a"]), SOURCE, 0, 1)


async def test_a_candidate_whose_input_width_is_not_its_feature_count_is_refused() -> None:
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression().fit(np.array([[0.0, 1.0], [1.0, 0.0]]), [0, 1])
    onnx = convert_sklearn(
        model, initial_types=[("input", FloatTensorType([None, 2]))], target_opset=17
    ).SerializeToString()
    with pytest.raises(CandidateUnusable, match=r"lists 3 features"):
        await run_backtest(_never, onnx, _mv(["a", "b", "c"]), SOURCE, 0, 1)
