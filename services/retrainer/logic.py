"""retrainer's pure logic: which jobs a batch of drift records asks for."""

from __future__ import annotations

from myelin.records import DriftDetected
from myelin.retraining import Trigger, drift_trigger


def drift_triggers(records: list[DriftDetected]) -> list[Trigger]:
    """One trigger per drifted (model, version), in the order first seen: the windows of
    one drift in a batch are one job (and across batches the job id says so too)."""
    seen: dict[tuple[str, int], Trigger] = {}
    for record in records:
        trigger = drift_trigger(record)
        seen.setdefault((trigger.model, trigger.drifted_version), trigger)
    return list(seen.values())


def due(last_run_s: float, now_s: float, every_s: float) -> bool:
    """Whether a scheduled retrain is due (``every_s`` 0: never)."""
    return every_s > 0 and now_s - last_run_s >= every_s
