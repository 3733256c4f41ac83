"""Time-travel backtest: score a candidate model version on the features the ledger recorded
as served in a past period, and set its metrics beside those of the versions that served.

``myelin models backtest NAME@VERSION --from T1 --to T2`` reads the Predict rows of the
model served in ``[T1, T2)`` (``route != 'shadow'``: a shadow row never served anyone) with
their outcome (:func:`myelin.quality.outcomes_sql`, from the model's ``label_source``),
builds the candidate's input from each row's served feature map in the candidate's own
feature order (a missing feature or a NaN reads as 0, the imputation serving applies),
scores it with onnxruntime, and reports per served ``(model_version, route)``:

- the served version's metrics (its own scores, as the ledger recorded them), and
- the candidate's metrics on exactly the same rows,

plus both over all the rows. No live traffic is involved, and nothing is written.

Errors (all :class:`BacktestError`, under :class:`~myelin.errors.MyelinError`)::

    BacktestError
    +-- BadTime              a --from / --to that is not a time, or an empty period
    +-- BadModelRef          not NAME@VERSION
    +-- NotFeatureAware      the candidate lists no input features in its provenance
    +-- CandidateUnusable    onnxruntime cannot load it, or its input is not [n, features]
    +-- NoLabelSource        neither the candidate nor the newest version names outcomes
    +-- NothingToBacktest    no judged (served and labelled) row in the period

Pure logic (SQL builders, metrics, the feature matrix, chunk planning, formatting) is
separate from the I/O (:func:`run_backtest` takes a query function; :func:`backtest_command`
connects to NATS), so the same code runs against chdb in tests and the warehouse service
from the CLI.
"""

from __future__ import annotations

import asyncio
import math
import re
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TypedDict

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc

from myelin.errors import MyelinError
from myelin.models import LabelSource, ModelVersion
from myelin.quality import EPS, outcomes_sql
from myelin.warehouse import DATABASE

if TYPE_CHECKING:
    from myelin.settings import Settings

Query = Callable[[str], Awaitable[pa.Table]]
Progress = Callable[[str], None]

#: Rows per warehouse read. A reply crosses NATS (16 MB max payload in the embedded stack)
#: as base64 Arrow; a ledger row with a handful of features is ~200-300 bytes there.
CHUNK_ROWS = 25_000
#: Rows per onnxruntime call: big enough that the per-call cost (~16 us) vanishes
#: (~0.1 us per row at 256+ rows), small enough to keep the output buffers modest.
SCORE_BATCH = 8192
_PLAN_BUCKETS = 256
_IDENT = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")  # a model name, as the registry checks it
_COLUMNS = "request_id, row, model_version, route, ts, entity_id, score, features, label"


class BacktestError(MyelinError):
    code = "backtest_error"


class BadTime(BacktestError):
    code = "bad_time"


class BadModelRef(BacktestError):
    code = "bad_model_ref"


class NotFeatureAware(BacktestError):
    code = "not_feature_aware"


class CandidateUnusable(BacktestError):
    code = "candidate_unusable"


class NoLabelSource(BacktestError):
    code = "no_label_source"


class NothingToBacktest(BacktestError):
    code = "nothing_to_backtest"


# ---------------------------------------------------------------------------------- SQL


def _at(ms: int) -> str:
    return f"fromUnixTimestamp64Milli(toInt64({int(ms)}), 'UTC')"


def _period(t_from_ms: int, t_to_ms: int) -> str:
    return f"ts >= {_at(t_from_ms)} AND ts < {_at(t_to_ms)}"


def backtest_sql(model: str, source: LabelSource, t_from_ms: int, t_to_ms: int) -> str:
    """The judged Predict rows of ``model`` served in ``[t_from_ms, t_to_ms)`` (shadow rows
    left out), with their ``label``: ``request_id, row, model_version, route, ts, entity_id,
    score, features, label`` ordered by ``ts, request_id, route, row`` (a shadow row shares
    its request id with the served one; the ledger keys rows by route too).

    Judged means what :func:`~myelin.quality.outcomes_sql` judges: with an ``event`` label
    source only inferences older than the label window (the rest of the period has no
    outcome yet); with a ``request`` source only labelled inferences."""
    return f"""
SELECT {_COLUMNS}
FROM ({outcomes_sql(model, source)}) AS o
WHERE {_period(t_from_ms, t_to_ms)} AND route != 'shadow'
ORDER BY ts, request_id, route, row"""


def served_counts_sql(model: str, t_from_ms: int, t_to_ms: int, bucket_ms: int) -> str:
    """Served (non-shadow) Predict rows of ``model`` per bucket of ``bucket_ms`` from
    ``t_from_ms``: ``b`` (bucket number), ``n``. Cheap (no join): plans the reads."""
    if not _IDENT.match(model):
        raise ValueError(f"model name {model!r} is not a plain identifier")
    return f"""
SELECT intDiv(toUnixTimestamp64Milli(ts) - {int(t_from_ms)}, {int(bucket_ms)}) AS b,
       count() AS n
FROM {DATABASE}.inferences FINAL
WHERE model = '{model}' AND api = 'predict' AND entity_id != '' AND route != 'shadow'
  AND {_period(t_from_ms, t_to_ms)}
GROUP BY b ORDER BY b"""


def plan_chunks(
    counts: Sequence[tuple[int, int]],
    t_from_ms: int,
    t_to_ms: int,
    bucket_ms: int,
    chunk_rows: int,
) -> list[tuple[int, int, int]]:
    """Cut ``[t_from_ms, t_to_ms)`` at bucket starts into contiguous spans of at most
    ``chunk_rows`` rows each where the buckets allow it: ``(from, to, rows)``.

    ``counts`` is ``(bucket, rows)`` for the non-empty buckets in order. A single bucket
    holding more than ``chunk_rows`` rows is one span of its own (the caller can refine it).
    The spans cover the whole period, so a row written after the plan is still read."""
    spans: list[tuple[int, int, int]] = []
    start, acc = t_from_ms, 0
    for bucket, n in counts:
        edge = t_from_ms + bucket * bucket_ms
        if acc and acc + n > chunk_rows and edge > start:
            spans.append((start, edge, acc))
            start, acc = edge, 0
        acc += n
    spans.append((start, t_to_ms, acc))
    return spans


# ------------------------------------------------------------------------------ metrics


class Metrics(TypedDict):
    """Quality of scores against labels, defined as in :mod:`myelin.quality`."""

    n: int
    positives: int
    auc: float  # ROC AUC, ties averaged (scikit-learn's roc_auc_score); NaN with one class
    logloss: float  # log(max(p, 1e-15)), log(max(1 - p, 1e-15)), as quality_sql
    mean_score: float
    positive_rate: float
    ece: float  # ten equal-width score bins: sum |sum(score - label)| / n


def _auc(s: npt.NDArray[np.float64], y: npt.NDArray[np.float64]) -> float:
    positives = float(y.sum())
    negatives = len(y) - positives
    if positives == 0 or negatives == 0:
        return math.nan
    # Mann-Whitney U with average ranks for ties: equal to the trapezoidal ROC area
    order = np.argsort(s, kind="mergesort")
    ordered = s[order]
    edges = np.flatnonzero(np.diff(ordered)) + 1
    starts = np.concatenate(([0], edges))
    ends = np.concatenate((edges, [len(s)]))
    ranks = np.empty(len(s), dtype=np.float64)
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    u = float(ranks[y == 1].sum()) - positives * (positives + 1) / 2.0
    return u / (positives * negatives)


def metrics(scores: npt.ArrayLike, labels: npt.ArrayLike) -> Metrics:
    """n, positives, auc, logloss, mean_score, positive_rate, ece of ``scores`` (probability
    of the positive class) against 0/1 ``labels``. No rows: n = 0 and NaN metrics."""
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    y = np.asarray(labels, dtype=np.float64).reshape(-1)
    if s.shape != y.shape:
        raise ValueError(f"{len(s)} scores but {len(y)} labels")
    n = len(s)
    if n == 0:
        nan = math.nan
        return Metrics(
            n=0, positives=0, auc=nan, logloss=nan, mean_score=nan, positive_rate=nan, ece=nan
        )
    # as quality_sql: log(greatest(score, eps)) and log(greatest(1 - score, eps))
    logloss = float(
        -(y * np.log(np.maximum(s, EPS)) + (1 - y) * np.log(np.maximum(1 - s, EPS))).mean()
    )
    bins = np.clip(np.floor(s * 10), 0, 9).astype(np.int64)
    per_bin = np.bincount(bins, weights=s - y, minlength=10)
    return Metrics(
        n=n,
        positives=int(y.sum()),
        auc=_auc(s, y),
        logloss=logloss,
        mean_score=float(s.mean()),
        positive_rate=float(y.mean()),
        ece=float(np.abs(per_bin).sum() / n),
    )


# ------------------------------------------------------------------ features and scoring


def _plain(arr: Any) -> Any:
    """One Arrow array, dictionary-decoded (a server may send LowCardinality that way)."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    if pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    return arr


def feature_matrix(
    served: pa.Array | pa.ChunkedArray, features: Sequence[str]
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """The candidate's input ``float32 [n, len(features)]`` from the served feature maps
    (``Map(String, Float64)``), columns in ``features`` order, and per feature the number of
    rows whose map lacks it. A missing feature, NaN or infinity reads as 0, as serving
    imputes (``services/inference/logic.feature_matrix``); a key the candidate does not
    read is ignored."""
    maps = _plain(served)
    x = np.zeros((len(maps), len(features)), dtype=np.float64)
    missing = np.zeros(len(features), dtype=np.int64)
    for j, name in enumerate(features):
        values = pc.map_lookup(maps, pa.scalar(name, maps.type.key_type), "first")
        missing[j] = values.null_count
        x[:, j] = values.to_numpy(zero_copy_only=False)  # null -> NaN
    # float64 -> float32 first, as serving does: a value past float32's range is inf -> 0
    with np.errstate(over="ignore"):
        m = x.astype(np.float32)
    return np.nan_to_num(m, nan=0.0, posinf=0.0, neginf=0.0), missing


_PROBABILITY_OUTPUTS = ("probabilities", "output_probability", "probability")


class Scorer:
    """A candidate's ONNX model on onnxruntime (CPU), checked against its feature list."""

    def __init__(self, onnx: bytes, n_features: int, who: str) -> None:
        import onnxruntime as ort

        try:
            session = ort.InferenceSession(onnx, providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - onnxruntime's errors share no base class
            raise CandidateUnusable(f"{who}: onnxruntime cannot load the artifact: {exc}") from None
        inputs = session.get_inputs()
        if len(inputs) != 1:
            raise CandidateUnusable(
                f"{who} takes {len(inputs)} inputs; a feature-aware model takes one [n, features]"
            )
        shape = list(inputs[0].shape)
        width = shape[1] if len(shape) == 2 else None
        if len(shape) != 2 or (isinstance(width, int) and width != n_features):
            raise CandidateUnusable(
                f"{who} takes input {inputs[0].name!r} of shape {shape}, but its provenance "
                f"lists {n_features} features: it cannot be fed [n, {n_features}]"
            )
        outputs = [o.name for o in session.get_outputs()]
        self._session = session
        self._input = inputs[0].name
        self._output = next((o for o in outputs if o in _PROBABILITY_OUTPUTS), outputs[-1])

    def score(self, x: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
        """The positive-class probability of each row, as serving reads it
        (``services/inference/logic.positive_scores``)."""
        parts: list[npt.NDArray[np.float64]] = []
        for i in range(0, len(x), SCORE_BATCH):
            (out,) = self._session.run([self._output], {self._input: x[i : i + SCORE_BATCH]})
            p = np.asarray(out, dtype=np.float64)
            parts.append(p[:, 1] if p.ndim == 2 and p.shape[1] >= 2 else p.reshape(-1))
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.float64)


# ------------------------------------------------------------------------------ the run


@dataclass(frozen=True)
class GroupResult:
    """One served ``(model_version, route)``: its own metrics and the candidate's on the
    same rows."""

    model_version: str
    route: str
    served: Metrics
    candidate: Metrics


@dataclass(frozen=True)
class BacktestReport:
    model: str
    candidate_version: int
    t_from_ms: int
    t_to_ms: int
    source: LabelSource
    rows: int  # judged rows, all groups
    served_rows: int  # served (non-shadow) Predict rows in the period, judged or not
    groups: tuple[GroupResult, ...]
    served: Metrics  # what served, over all the rows
    candidate: Metrics  # the candidate, over the same rows
    features: tuple[str, ...]  # the candidate's input order
    missing: dict[str, int] = field(default_factory=dict)  # feature -> rows without it
    judged_to_ms: int = 0  # event labels: outcomes are known for inferences before this
    warnings: tuple[str, ...] = ()


def _version_key(group: tuple[str, str]) -> tuple[int, str, str]:
    version, route = group
    return (int(version) if version.isdigit() else sys.maxsize, version, route)


def _iso(ms: int) -> str:
    t = datetime.fromtimestamp(ms / 1000, tz=UTC)
    text = t.strftime("%Y-%m-%dT%H:%M:%S")
    return text + (f".{ms % 1000:03d}Z" if ms % 1000 else "Z")


async def _plan(
    query: Query, model: str, t_from_ms: int, t_to_ms: int, chunk_rows: int
) -> list[tuple[int, int, int]]:
    bucket = max(1, -(-(t_to_ms - t_from_ms) // _PLAN_BUCKETS))
    table = await query(served_counts_sql(model, t_from_ms, t_to_ms, bucket))
    counts = [(int(r["b"]), int(r["n"])) for r in table.to_pylist()]
    spans: list[tuple[int, int, int]] = []
    for lo, hi, n in plan_chunks(counts, t_from_ms, t_to_ms, bucket, chunk_rows):
        if n > chunk_rows and bucket > 1:  # one dense bucket: cut it finer
            spans.extend(await _plan(query, model, lo, hi, chunk_rows))
        else:
            spans.append((lo, hi, n))
    return spans


def _nothing(
    model: str, source: LabelSource, t_from_ms: int, t_to_ms: int, served: int, judged_to: int
) -> NothingToBacktest:
    period = f"between {_iso(t_from_ms)} and {_iso(t_to_ms)}"
    if not served:
        return NothingToBacktest(
            f"no Predict inference of {model} was served {period} (shadow rows left out): pick "
            f'a period with traffic, e.g. see myelin sql "SELECT min(ts), max(ts), count() '
            f"FROM {DATABASE}.inferences WHERE model = '{model}'\"",
            served_rows=0,
        )
    if source.kind == "event":
        why = (
            f"an inference is judged once its label window ({source.window_s} s for a "
            f"{source.event_type!r} event) has passed, so only inferences before about "
            f"{_iso(judged_to)} have an outcome: move --to earlier or wait"
        )
    else:
        why = (
            f"no {source.event_type!r} event labels any of them (by {source.request_field!r}) "
            "in the warehouse: are labels being produced and stored?"
        )
    return NothingToBacktest(
        f"{served:,} inferences of {model} were served {period} but none has a known "
        f"outcome yet: {why}",
        served_rows=served,
    )


async def run_backtest(
    query: Query,
    candidate_onnx: bytes,
    candidate: ModelVersion,
    source: LabelSource,
    t_from_ms: int,
    t_to_ms: int,
    progress: Progress | None = None,
    *,
    chunk_rows: int = CHUNK_ROWS,
    now_ms: int | None = None,
) -> BacktestReport:
    """Score ``candidate`` on the judged rows its model served in ``[t_from_ms, t_to_ms)``.

    ``query`` runs read-only SQL and returns an Arrow table (the warehouse service over
    NATS, or a warehouse directly). Rows are read in time-sliced chunks of about
    ``chunk_rows``; with more than one chunk, ``progress`` (if given) receives a line per
    chunk. ``now_ms`` (default: the clock) only dates the end of the judged period in the
    report."""
    who = f"{candidate.name} v{candidate.version}"
    features = list(candidate.provenance.features)
    if not features:
        raise NotFeatureAware(
            f"{who} lists no input features in its provenance (provenance.features): it is "
            "not feature-aware, so there is no way to build its input from served features"
        )
    if t_from_ms >= t_to_ms:
        raise BadTime(
            f"the period {_iso(t_from_ms)} .. {_iso(t_to_ms)} is empty: --from must be before --to"
        )
    scorer = Scorer(candidate_onnx, len(features), who)
    now = int(time.time() * 1000) if now_ms is None else now_ms
    judged_to = min(t_to_ms, now - source.window_s * 1000) if source.kind == "event" else t_to_ms

    spans = await _plan(query, candidate.name, t_from_ms, t_to_ms, chunk_rows)
    served_rows = sum(n for _, _, n in spans)
    talk = progress is not None and len(spans) > 1
    if talk and progress is not None:
        progress(
            f"backtest {who}: {served_rows:,} served rows in {len(spans)} chunks "
            f"({_iso(t_from_ms)} .. {_iso(t_to_ms)})"
        )
    t0 = time.perf_counter()
    groups: dict[tuple[str, str], int] = {}
    served_s: list[npt.NDArray[np.float64]] = []
    cand_s: list[npt.NDArray[np.float64]] = []
    labels: list[npt.NDArray[np.float64]] = []
    codes: list[npt.NDArray[np.int64]] = []
    missing = np.zeros(len(features), dtype=np.int64)
    done = 0
    for lo, hi, n in spans:
        if n:
            table = await query(backtest_sql(candidate.name, source, lo, hi))
            if table.num_rows:
                x, miss = feature_matrix(table.column("features"), features)
                missing += miss
                cand_s.append(await asyncio.to_thread(scorer.score, x))
                served_s.append(
                    np.asarray(
                        _plain(table.column("score")).to_numpy(zero_copy_only=False),
                        dtype=np.float64,
                    )
                )
                labels.append(
                    np.asarray(
                        _plain(table.column("label")).to_numpy(zero_copy_only=False),
                        dtype=np.float64,
                    )
                )
                codes.append(_group_codes(table, groups))
        done += n
        if talk and progress is not None:
            rate = done / max(time.perf_counter() - t0, 1e-9)
            progress(
                f"  backtest: {done:,}/{served_rows:,} served rows read and scored "
                f"({done / max(served_rows, 1):.0%}, {rate:,.0f} rows/s)"
            )
    if not labels:
        raise _nothing(candidate.name, source, t_from_ms, t_to_ms, served_rows, judged_to)

    s_all, c_all = np.concatenate(served_s), np.concatenate(cand_s)
    y_all, g_all = np.concatenate(labels), np.concatenate(codes)
    results = []
    for key in sorted(groups, key=_version_key):
        mask = g_all == groups[key]
        results.append(
            GroupResult(
                key[0], key[1], metrics(s_all[mask], y_all[mask]), metrics(c_all[mask], y_all[mask])
            )
        )
    lacking = {f: int(k) for f, k in zip(features, missing, strict=True) if k}
    warnings = []
    if lacking:
        parts = ", ".join(
            f"{f} (missing in {k:,} of {len(y_all):,} rows)" for f, k in lacking.items()
        )
        warnings.append(
            f"{who} reads features the served rows did not record: {parts}; they were "
            "scored as 0, serving's imputation for a missing value, so the candidate's "
            "metrics on those rows are not what it would have scored with them"
        )
    return BacktestReport(
        model=candidate.name,
        candidate_version=candidate.version,
        t_from_ms=t_from_ms,
        t_to_ms=t_to_ms,
        source=source,
        rows=len(y_all),
        served_rows=served_rows,
        groups=tuple(results),
        served=metrics(s_all, y_all),
        candidate=metrics(c_all, y_all),
        features=tuple(features),
        missing=lacking,
        judged_to_ms=judged_to,
        warnings=tuple(warnings),
    )


def _group_codes(table: pa.Table, groups: dict[tuple[str, str], int]) -> npt.NDArray[np.int64]:
    """Each row's ``(model_version, route)`` as an index into ``groups`` (added to it)."""
    key = pc.binary_join_element_wise(
        _plain(table.column("model_version")), _plain(table.column("route")), "\x00"
    )
    enc = key.dictionary_encode()
    lut = np.zeros(len(enc.dictionary), dtype=np.int64)
    for i, k in enumerate(enc.dictionary.to_pylist()):
        version, _, route = k.partition("\x00")
        lut[i] = groups.setdefault((version, route), len(groups))
    codes: npt.NDArray[np.int64] = lut[enc.indices.to_numpy(zero_copy_only=False)]
    return codes


# ----------------------------------------------------------------------------- display


def _row(label: str, route: str, m: Metrics) -> str:
    return (
        f"{label:<16} {route:<12} {m['n']:>9,} {m['positives']:>8,} {m['auc']:>6.3f} "
        f"{m['logloss']:>8.4f} {m['mean_score']:>6.3f} {m['positive_rate']:>6.3f} "
        f"{m['ece']:>6.3f}"
    )


def _delta(name: str, cand: float, served: float, fmt: str) -> str:
    return f"{name} {cand - served:+{fmt}} ({cand:{fmt}} vs {served:{fmt}})"


def describe_source(source: LabelSource) -> str:
    if source.kind == "event":
        return (
            f"1 when a {source.event_type!r} event of the same entity follows within "
            f"{source.window_s} s"
        )
    return (
        f"{source.event_type}.{source.value_field} > 0 of the event naming the request in "
        f"{source.request_field!r} (unlabelled inferences left out)"
    )


def format_report(report: BacktestReport) -> str:
    """A fixed-width table: each served version/route, the candidate on its rows, the
    totals, and the candidate against what served on the same rows."""
    cand = f"candidate v{report.candidate_version}"
    lines = [
        f"backtest of {report.model} v{report.candidate_version} on "
        f"{_iso(report.t_from_ms)} .. {_iso(report.t_to_ms)}",
        f"{report.rows:,} judged rows of {report.served_rows:,} served (shadow rows left out); "
        f"label: {describe_source(report.source)}",
    ]
    if report.source.kind == "event" and report.judged_to_ms < report.t_to_ms:
        lines.append(
            f"outcomes are known only for inferences before about {_iso(report.judged_to_ms)} "
            "(the label window has not passed for later ones)"
        )
    lines.append(
        f"{'model':<16} {'route':<12} {'n':>9} {'pos':>8} {'auc':>6} {'logloss':>8} "
        f"{'mean':>6} {'rate':>6} {'ece':>6}"
    )
    for g in report.groups:
        lines.append(_row(f"v{g.model_version}", g.route, g.served))
        lines.append(_row(f"  {cand}", "same rows", g.candidate))
    lines.append(_row("served (all)", "", report.served))
    lines.append(_row(cand, "same rows", report.candidate))
    c, s = report.candidate, report.served
    lines.append(
        f"same rows: {cand} vs served: "
        + ", ".join(
            (
                _delta("auc", c["auc"], s["auc"], ".3f"),
                _delta("logloss", c["logloss"], s["logloss"], ".4f"),
                _delta("ece", c["ece"], s["ece"], ".3f"),
                _delta("mean", c["mean_score"], s["mean_score"], ".3f"),
            )
        )
        + f" (positive rate {s['positive_rate']:.3f})"
    )
    lines.extend(f"warning: {w}" for w in report.warnings)
    return "\n".join(lines)


# -------------------------------------------------------------------------- CLI inputs

_RELATIVE = re.compile(r"^(?:now\s*)?-\s*(\d+(?:\.\d+)?)\s*([smhdw])$")
_UNIT_MS = {"s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000, "w": 604_800_000}
_TIME_FORMS = (
    "use ISO 8601 (2026-05-01T10:00:00Z; no zone means UTC), 'now', a time relative to "
    "now (-30m, -2h, -7d), or milliseconds since the epoch"
)


def parse_time(text: str, now_ms: int) -> int:
    """Milliseconds since the epoch of ``text``: ISO 8601 (naive = UTC), ``now``, ``-45s``,
    ``-30m``, ``-2h``, ``-7d``, ``-1w`` (before ``now_ms``), or epoch milliseconds."""
    t = text.strip().lower()
    if not t:
        raise BadTime(f"an empty time: {_TIME_FORMS}")
    if t == "now":
        return now_ms
    rel = _RELATIVE.match(t)
    if rel:
        return now_ms - round(float(rel.group(1)) * _UNIT_MS[rel.group(2)])
    if t.isdigit():
        return int(t)
    iso = text.strip()
    if iso[-1:] in ("Z", "z"):
        iso = iso[:-1] + "+00:00"
    try:
        when = datetime.fromisoformat(iso)
    except ValueError:
        raise BadTime(f"{text!r} is not a time: {_TIME_FORMS}") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return round(when.timestamp() * 1000)


def parse_model_ref(ref: str) -> tuple[str, str]:
    """``NAME@VERSION`` -> (name, version or alias): ``ctr@3``, ``ctr@v3``, ``ctr@champion``."""
    from myelin.models import RegistryError, check_name

    name, at, version = ref.strip().partition("@")
    if not at or not name or not version:
        raise BadModelRef(
            f"{ref!r} is not NAME@VERSION: name a version (ctr@3) or an alias (ctr@champion)"
        )
    try:
        check_name(name)
    except RegistryError as exc:
        raise BadModelRef(exc.message) from None
    if re.fullmatch(r"[vV]\d+", version):
        version = version[1:]
    return name, version


async def backtest_command(settings: Settings, ref: str, t_from: str, t_to: str) -> int:
    """``myelin models backtest NAME@VERSION --from T1 --to T2``: print the report (stdout),
    progress on long reads (stderr); 0 on success, a :class:`BacktestError` (or another
    :class:`~myelin.errors.MyelinError`) otherwise."""
    from myelin import bus
    from myelin.models import ModelRegistry
    from myelin.sql_client import query as sql_query
    from myelin.stack.nats_connect import connect_once

    name, version = parse_model_ref(ref)
    now = int(time.time() * 1000)
    t_from_ms, t_to_ms = parse_time(t_from, now), parse_time(t_to, now)
    if t_from_ms >= t_to_ms:
        raise BadTime(
            f"--from {t_from!r} ({_iso(t_from_ms)}) is not before --to {t_to!r} ({_iso(t_to_ms)})"
        )
    nc = await connect_once(settings, "cli", hint="is 'myelin up' running? (MYELIN_NATS_URL)")
    try:
        reg = ModelRegistry(nc, bus.jetstream(nc, settings))
        candidate = await reg.resolve(name, version)
        source = candidate.provenance.label_source
        if source is None:
            versions = await reg.versions(name)
            newest = await reg.get(name, versions[-1]) if versions else None
            source = newest.provenance.label_source if newest else None
            if source is None:
                raise NoLabelSource(
                    f"neither {name} v{candidate.version} nor its newest version names a label "
                    "source (provenance.label_source): its outcomes cannot be joined, so "
                    "there is nothing to measure against"
                )
        onnx = await reg.artifact(candidate)

        async def query(sql: str) -> pa.Table:
            table: pa.Table = await sql_query(nc, sql, timeout=300)
            return table

        def progress(line: str) -> None:
            print(line, file=sys.stderr, flush=True)

        report = await run_backtest(
            query, onnx, candidate, source, t_from_ms, t_to_ms, progress, now_ms=now
        )
    finally:
        await nc.close()
    print(format_report(report))
    return 0
