"""Drift evaluation, off the hot path: every window, each loaded version's counters are
taken and compared with its reference (:mod:`myelin.drift`); a breach is published as a
``DriftDetected`` record on ``myelin.drift.<model>`` (stream MYELIN_DRIFT, drained into
``myelin.drift_events``) and counted.

A window with fewer rows than the reference's ``min_samples`` is not judged: its counts
carry over into the next window until there are enough, so a quiet model is judged on
longer stretches of traffic rather than never. A record that cannot be published yet is
kept and published with the next window's (its message id makes a repeat harmless).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import msgspec

from myelin.bus import OutMsg, Publisher
from myelin.drift import compare_all
from myelin.records import ColumnDrift, DriftDetected
from myelin.subjects import drift_subject
from services.inference.model_host import LoadedModel, ModelHost

log = logging.getLogger(__name__)
_enc = msgspec.msgpack.Encoder()


@dataclass
class _Pending:
    start_ms: int
    counts: list[list[int]]
    rows: int


class DriftWatch:
    def __init__(self, host: ModelHost, publisher: Publisher, window_s: float) -> None:
        self._host = host
        self._pub = publisher
        self.window_s = window_s
        self._pending: dict[tuple[str, str], _Pending] = {}
        self._outbox: list[OutMsg] = []
        self._window_start_ms = int(time.time() * 1000)
        self.detected: dict[str, int] = {}  # "model:vN" -> breaches published
        self.scores: dict[str, float] = {}  # "model:vN:feature:figure" -> the latest figure
        self.windows = 0

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.window_s)
            try:
                await self.evaluate()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("drift evaluation failed")

    async def evaluate(self, now_ms: int | None = None) -> list[DriftDetected]:
        """Close the window: judge every version with enough rows; publish breaches."""
        end_ms = int(time.time() * 1000) if now_ms is None else now_ms
        start_ms, self._window_start_ms = self._window_start_ms, end_ms
        found: list[DriftDetected] = []
        for model in self._host.loaded():
            record = self._judge(model, start_ms, end_ms)
            if record is not None:
                found.append(record)
        self.windows += 1
        await self._publish()
        return found

    def _judge(self, model: LoadedModel, start_ms: int, end_ms: int) -> DriftDetected | None:
        counters = model.drift
        if counters is None:
            return None
        counts, rows = counters.take()
        key = (model.mv.name, model.version)
        pending = self._pending.get(key)
        if pending is None:
            pending = self._pending[key] = _Pending(start_ms, counts, rows)
        else:
            pending.counts = [
                [a + b for a, b in zip(x, y, strict=True)]
                for x, y in zip(pending.counts, counts, strict=True)
            ]
            pending.rows += rows
        ref = counters.reference
        if pending.rows < ref.policy.min_samples:
            return None
        del self._pending[key]
        columns = compare_all(ref, pending.counts)
        label = f"{model.mv.name}:v{model.version}"
        for c in columns:
            for figure in ("psi", "js", "wasserstein", "ks"):
                self.scores[f"{label}:{c.feature}:{figure}"] = getattr(c, figure)
        drifted = [c.feature for c in columns if c.breached]
        if not drifted:
            return None
        record = DriftDetected(
            drift_id=f"{label}:{pending.start_ms}",
            ts_ms=end_ms,
            model=model.mv.name,
            model_version=model.version,
            window_start_ms=pending.start_ms,
            window_end_ms=end_ms,
            samples=pending.rows,
            drifted=drifted,
            columns=[ColumnDrift(**msgspec.structs.asdict(c)) for c in columns],
            thresholds={k: float(v) for k, v in msgspec.structs.asdict(ref.policy).items()},
        )
        self.detected[label] = self.detected.get(label, 0) + 1
        log.warning(
            "drift: %s over %d rows in %s",
            label,
            pending.rows,
            ", ".join(f"{c.feature} ({'/'.join(c.breached)})" for c in columns if c.breached),
        )
        self._outbox.append(
            OutMsg(drift_subject(model.mv.name), _enc.encode(record), f"drift-{record.drift_id}")
        )
        return record

    async def _publish(self) -> None:
        if not self._outbox:
            return
        results = await self._pub.publish_batch(self._outbox)
        self._outbox = [m for m, r in zip(self._outbox, results, strict=True) if not r.ok]
        if self._outbox:
            log.warning(
                "%d drift records not stored yet; kept for the next window", len(self._outbox)
            )

    def pending_rows(self) -> dict[str, int]:
        """Rows counted but not judged yet, per version (the current window included)."""
        out = {f"{n}:v{v}": p.rows for (n, v), p in self._pending.items()}
        for m in self._host.loaded():
            if m.drift is not None:
                label = f"{m.mv.name}:v{m.version}"
                out[label] = out.get(label, 0) + m.drift.rows
        return out
