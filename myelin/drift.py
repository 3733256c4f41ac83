"""Drift: reference distributions frozen at registration, and the distance of what is
served from them, as pure functions on quantile bins.

At registration every input feature of a model, and its score, gets a :class:`Bins`: up
to ``bins`` quantile bins of the training set (edges are training values, so a value sits
in the same bin whether it is read as float32 or float64), the reference count of each
bin, each bin's mean (where Wasserstein-1 places its mass) and the reference standard
deviation. A value ``v`` falls in bin ``i`` when ``edges[i-1] < v <= edges[i]`` (bisect
left); below the first edge is bin 0, above the last the last bin.

The serving process only counts values per bin (:mod:`services.inference.drift_counters`);
:func:`compare` turns a window of counts into four figures per feature, each with the
definition of a named reference implementation (the tests check them against it to 1e-9):

- **PSI**, the population stability index: ``sum((q - p) * ln(q / p))`` over bins, with
  empty bins counted as 0.0001 (Evidently's definition).
- **JS**: the Jensen-Shannon distance in base 2, in [0, 1] (``scipy.spatial.distance
  .jensenshannon(p, q, base=2)``; Evidently's ``jensenshannon`` test).
- **W1**: the Wasserstein-1 distance between the binned distributions (mass at each bin's
  reference mean), divided by the reference standard deviation, so one threshold suits
  every feature (``scipy.stats.wasserstein_distance`` / std; Evidently's
  ``wasserstein`` test).
- **KS**: the Kolmogorov-Smirnov statistic on the binned CDFs, the largest gap between
  them (``scipy.stats.ks_2samp``'s statistic on the same bins).

A feature drifts in a window when it has at least ``min_samples`` values and any figure
reaches its threshold (:class:`DriftPolicy`): effect sizes, not p-values, so a large
window of traffic does not make a negligible shift significant.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from typing import Annotated

import msgspec
import numpy as np
import numpy.typing as npt

PSI_FLOOR = 1e-4  # an empty bin's share, for PSI (Evidently's convention)
SCORE = "__score__"  # the column name of the model's score in a Reference
METRICS = ("psi", "js", "wasserstein", "ks")


class Bins(msgspec.Struct, frozen=True, kw_only=True):
    """A frozen reference distribution of one feature (or the score)."""

    edges: list[float]  # interior cut points, strictly increasing; len(counts) - 1 of them
    counts: list[int]  # reference values per bin
    means: list[float]  # each bin's reference mean (the bin's midpoint if it is empty)
    std: float  # of the reference values

    def index(self, value: float) -> int:
        """The bin of ``value`` (NaN is counted as 0, the serving imputation)."""
        return bisect.bisect_left(self.edges, value if value == value else 0.0)


class DriftPolicy(msgspec.Struct, frozen=True, kw_only=True):
    """When a window of traffic counts as drifted (per feature)."""

    min_samples: Annotated[int, msgspec.Meta(ge=1)] = 500
    psi: Annotated[float, msgspec.Meta(gt=0)] = 0.2
    js: Annotated[float, msgspec.Meta(gt=0)] = 0.1
    wasserstein: Annotated[float, msgspec.Meta(gt=0)] = 0.1
    ks: Annotated[float, msgspec.Meta(gt=0)] = 0.1


class Reference(msgspec.Struct, frozen=True, kw_only=True):
    """Every input feature's reference bins, in the model's feature order, and the score's."""

    features: list[str]
    bins: list[Bins]  # one per feature, then one for the score
    rows: int  # reference rows
    policy: DriftPolicy = DriftPolicy()

    @property
    def columns(self) -> list[str]:
        return [*self.features, SCORE]


class Scores(msgspec.Struct, frozen=True, kw_only=True):
    """One feature's (or the score's) drift in one window."""

    feature: str
    samples: int
    psi: float
    js: float
    wasserstein: float
    ks: float
    breached: list[str]  # which of METRICS reached their threshold ([] below min_samples)


def build_bins(values: npt.ArrayLike, bins: int = 10) -> Bins:
    """Quantile bins of ``values`` (NaN read as 0): at most ``bins``, fewer when values
    repeat (a count feature that is mostly 0 gets a bin for 0)."""
    if bins < 1:
        raise ValueError("bins must be at least 1")
    v = np.nan_to_num(np.asarray(values, dtype=np.float64).reshape(-1), nan=0.0)
    if v.size == 0:
        raise ValueError("a reference needs at least one value")
    qs = np.quantile(v, np.linspace(0.0, 1.0, bins + 1)[1:-1], method="lower")
    # the largest value never closes a bin of its own: it belongs in the last one
    edges = np.unique(qs[qs < v.max()])
    idx = np.searchsorted(edges, v, side="left")
    counts = np.bincount(idx, minlength=len(edges) + 1)
    sums = np.bincount(idx, weights=v, minlength=len(edges) + 1)
    bounds = [float(v.min()), *edges.tolist(), float(v.max())]
    means = [
        float(sums[i] / counts[i]) if counts[i] else (bounds[i] + bounds[i + 1]) / 2
        for i in range(len(counts))
    ]
    return Bins(
        edges=[float(e) for e in edges],
        counts=[int(c) for c in counts],
        means=means,
        std=float(v.std()),
    )


def build_reference(
    features: Sequence[str],
    x: npt.ArrayLike,
    scores: npt.ArrayLike,
    *,
    bins: int = 10,
    policy: DriftPolicy | None = None,
) -> Reference:
    """The reference of a model from its training matrix ``x`` ([rows, features], in the
    model's feature order, as the model saw it) and its scores on those rows."""
    m = np.asarray(x, dtype=np.float64)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if m.ndim != 2 or m.shape[1] != len(features):
        raise ValueError(f"x has shape {m.shape}; expected [rows, {len(features)}]")
    if m.shape[0] != s.shape[0]:
        raise ValueError(f"{m.shape[0]} rows but {s.shape[0]} scores")
    cols = [build_bins(m[:, j], bins) for j in range(m.shape[1])]
    return Reference(
        features=list(features),
        bins=[*cols, build_bins(s, bins)],
        rows=int(m.shape[0]),
        policy=policy or DriftPolicy(),
    )


def _cdf(counts: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    out: npt.NDArray[np.float64] = np.cumsum(counts) / counts.sum()
    return out


def psi(ref: Sequence[int], cur: Sequence[int]) -> float:
    p = np.asarray(ref, dtype=np.float64)
    q = np.asarray(cur, dtype=np.float64)
    p = np.maximum(p / p.sum(), PSI_FLOOR)
    q = np.maximum(q / q.sum(), PSI_FLOOR)
    return float(np.sum((q - p) * np.log(q / p)))


def js_distance(ref: Sequence[int], cur: Sequence[int]) -> float:
    p = np.asarray(ref, dtype=np.float64)
    q = np.asarray(cur, dtype=np.float64)
    p, q = p / p.sum(), q / q.sum()
    m = (p + q) / 2

    def kl(a: npt.NDArray[np.float64]) -> float:
        nz = a > 0
        return float(np.sum(a[nz] * np.log2(a[nz] / m[nz])))

    return math.sqrt(max((kl(p) + kl(q)) / 2, 0.0))


def wasserstein(bins: Bins, cur: Sequence[int]) -> float:
    """W1 between the reference and ``cur`` with mass at the bins' means, over the
    reference standard deviation (raw W1 when the reference is constant)."""
    p = _cdf(np.asarray(bins.counts, dtype=np.float64))
    q = _cdf(np.asarray(cur, dtype=np.float64))
    w = float(np.sum(np.abs(p - q)[:-1] * np.diff(np.asarray(bins.means, dtype=np.float64))))
    return w / bins.std if bins.std > 0 else w


def ks(ref: Sequence[int], cur: Sequence[int]) -> float:
    p = _cdf(np.asarray(ref, dtype=np.float64))
    q = _cdf(np.asarray(cur, dtype=np.float64))
    return float(np.max(np.abs(p - q)))


def compare(name: str, bins: Bins, cur: Sequence[int], policy: DriftPolicy) -> Scores:
    """One column's figures for a window of counts (``cur``, one per bin)."""
    if len(cur) != len(bins.counts):
        raise ValueError(f"{name}: {len(cur)} counts for {len(bins.counts)} bins")
    n = int(sum(cur))
    if n == 0:
        return Scores(
            feature=name, samples=0, psi=0.0, js=0.0, wasserstein=0.0, ks=0.0, breached=[]
        )
    figures = {
        "psi": psi(bins.counts, cur),
        "js": js_distance(bins.counts, cur),
        "wasserstein": wasserstein(bins, cur),
        "ks": ks(bins.counts, cur),
    }
    breached = (
        [m for m in METRICS if figures[m] >= getattr(policy, m)] if n >= policy.min_samples else []
    )
    return Scores(feature=name, samples=n, breached=breached, **figures)


def compare_all(ref: Reference, counts: Sequence[Sequence[int]]) -> list[Scores]:
    """Every column's figures (features, then the score) for one window of counts."""
    if len(counts) != len(ref.bins):
        raise ValueError(f"{len(counts)} count vectors for {len(ref.bins)} columns")
    return [
        compare(name, b, c, ref.policy)
        for name, b, c in zip(ref.columns, ref.bins, counts, strict=True)
    ]
