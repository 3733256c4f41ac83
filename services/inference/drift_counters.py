"""Per model version drift counters: how many served values fell in each reference bin of
every input feature and of the score, in the current window (pure; no I/O).

The hot path pays one bisect and one list increment per column and row: no allocation
beyond the integers counted, nothing per request but the loop. A window is taken whole
(:meth:`DriftCounters.take`) by the evaluator, off the hot path.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence

from myelin.drift import Reference


class DriftCounters:
    def __init__(self, reference: Reference) -> None:
        self.reference = reference
        self._feature_edges = [b.edges for b in reference.bins[:-1]]
        self._score_edges = reference.bins[-1].edges
        sizes = [len(b.counts) for b in reference.bins]
        self._offsets = [sum(sizes[:j]) for j in range(len(sizes))]
        self._sizes = sizes
        self._score_offset = self._offsets[-1]
        self._columns = list(zip(self._feature_edges, self._offsets[:-1], strict=True))
        self._counts = [0] * sum(sizes)
        self.rows = 0

    def observe(self, rows: Sequence[Sequence[float]], scores: Sequence[float]) -> None:
        """Count rows as the model saw them (in its feature order, imputed) and their scores."""
        c = self._counts
        columns = self._columns
        score_edges, score_offset = self._score_edges, self._score_offset
        for row, score in zip(rows, scores, strict=True):
            for (edges, offset), value in zip(columns, row, strict=True):
                c[offset + bisect_left(edges, value)] += 1
            c[score_offset + bisect_left(score_edges, score)] += 1
        self.rows += len(scores)

    def take(self) -> tuple[list[list[int]], int]:
        """The window's counts per column (features, then the score) and its row count;
        the counters start again at zero."""
        counts, rows = self._counts, self.rows
        self._counts, self.rows = [0] * len(counts), 0
        return [counts[o : o + n] for o, n in zip(self._offsets, self._sizes, strict=True)], rows
