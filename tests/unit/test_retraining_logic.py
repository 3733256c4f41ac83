"""The pure parts of retraining: job ids, who may take a job over, the training-set
fingerprint, the bounded SQL, label builders and loading a trainer."""

from __future__ import annotations

import pyarrow as pa
import pytest

from myelin.records import DriftDetected
from myelin.retraining import (
    JobStateName,
    RetrainError,
    RetrainJob,
    Trigger,
    drift_trigger,
    fingerprint,
    job_id,
    reclaimable,
)
from myelin.trainers import TrainerError, load_trainer, time_split
from myelin.training import (
    LabelSpecError,
    clicked_impressions_sql,
    labels_spec,
    labels_sql,
    training_set_sql,
)
from services.retrainer.logic import drift_triggers, due


def _drift(version: str, start: int, model: str = "ctr") -> DriftDetected:
    return DriftDetected(
        drift_id=f"{model}:v{version}:{start}",
        ts_ms=start,
        model=model,
        model_version=version,
        window_start_ms=start,
        window_end_ms=start + 60_000,
        samples=1000,
        drifted=["x"],
        columns=[],
        thresholds={},
    )


def test_a_drift_is_one_job_per_version_and_a_command_one_per_bound() -> None:
    assert job_id(drift_trigger(_drift("3", 0)), None) == "ctr.drift.v3"
    assert job_id(drift_trigger(_drift("v3", 60_000)), 99) == "ctr.drift.v3"  # bound ignored
    assert job_id(Trigger("command", "ctr", bound=7), 7) == "ctr.seq.7"
    assert job_id(Trigger("schedule", "ctr"), 7) == "ctr.seq.7"  # the same job as a command
    with pytest.raises(RetrainError, match="not a version number"):
        drift_trigger(_drift("latest", 0))
    with pytest.raises(RetrainError, match="needs its bound"):
        job_id(Trigger("command", "ctr"), None)
    batch = [_drift("3", 0), _drift("3", 60_000), _drift("1", 0, "other"), _drift("4", 0)]
    assert [(t.model, t.drifted_version, t.ref) for t in drift_triggers(batch)] == [
        ("ctr", 3, "ctr:v3:0"),
        ("other", 1, "other:v1:0"),
        ("ctr", 4, "ctr:v4:0"),
    ]


def _job(
    state: JobStateName, *, heartbeat: int = 0, finished: int = 0, transient: bool = False
) -> RetrainJob:
    return RetrainJob(
        job_id="ctr.seq.1",
        model="ctr",
        state=state,
        trigger="command",
        heartbeat_ms=heartbeat,
        finished_ms=finished,
        transient=transient,
    )


@pytest.mark.parametrize(
    ("job", "force", "expected"),
    [
        (_job("running", heartbeat=9_000), True, False),  # alive: never, even forced
        (_job("running", heartbeat=7_000), False, True),  # silent 3 s > 2 s: died
        (_job("failed", finished=9_000), False, False),  # failed a moment ago
        (_job("failed", finished=9_000, transient=True), False, True),  # may pass: at once
        (_job("failed", finished=4_000), False, True),  # failed 6 s ago >= 5 s
        (_job("failed", finished=9_000), True, True),
        (_job("done"), False, False),
        (_job("denied"), False, False),
        (_job("done"), True, True),
    ],
)
def test_who_may_take_a_job_over(job: RetrainJob, force: bool, expected: bool) -> None:
    assert reclaimable(job, 10_000, stale_ms=2_000, retry_ms=5_000, force=force) is expected


def _table(ts_type: pa.DataType, label_type: pa.DataType, chunks: int = 1) -> pa.Table:
    ts = [1_000, 2_000, 2_000, 3_500]
    scale = 1000 if ts_type.unit == "us" else 1
    t = pa.table(
        {
            "entity_id": pa.array(["a", "b", "é", ""], pa.string()),
            "ts": pa.array([v * scale for v in ts], ts_type),
            "label": pa.array([0, 1, 1, 0], label_type),
            "features_as_of": pa.array([0, 900 * scale, 0, 3_000 * scale], ts_type),
            "x": pa.array([0.0, 1.5, float("nan"), -2.0]),
        }
    )
    if chunks > 1:
        t = pa.concat_tables([t.slice(0, 1), t.slice(1)])
    return t


def test_the_fingerprint_depends_on_the_rows_not_on_how_they_are_typed_or_chunked() -> None:
    base = fingerprint(_table(pa.timestamp("ms", tz="UTC"), pa.uint8()), ["x"])
    assert len(base) == 64
    assert fingerprint(_table(pa.timestamp("us", tz="UTC"), pa.int64(), chunks=2), ["x"]) == base
    changed = _table(pa.timestamp("ms", tz="UTC"), pa.uint8())
    changed = changed.set_column(4, "x", pa.array([0.0, 1.5, float("nan"), -2.5]))
    assert fingerprint(changed, ["x"]) != base
    reordered = _table(pa.timestamp("ms", tz="UTC"), pa.uint8()).take([1, 0, 2, 3])
    assert fingerprint(reordered, ["x"]) != base
    # "a" + "b" is not "ab" + "": ids are length-prefixed
    merged = _table(pa.timestamp("ms", tz="UTC"), pa.uint8())
    merged = merged.set_column(0, "entity_id", pa.array(["ab", "", "é", ""]))
    assert fingerprint(merged, ["x"]) != base


def test_bounded_sql_keeps_event_sequences_below_the_next_message() -> None:
    unbounded = training_set_sql("v", ["x"], clicked_impressions_sql(60), version="ab")
    assert "stream_seq <" not in unbounded
    assert clicked_impressions_sql(60) == labels_sql("clicked_impressions:60")
    bounded = training_set_sql(
        "v", ["x"], labels_sql("clicked_impressions:60", max_seq=41), version="ab", max_seq=41
    )
    # EVENTS message 41 holds event sequences 41000..41999
    assert bounded.count("stream_seq < 42000") == 4  # impressions, clicks, watermark, rows
    with pytest.raises(ValueError, match=">= 0"):
        training_set_sql("v", ["x"], "SELECT 1", max_seq=-1)


def test_label_builders_are_named_and_refused_clearly() -> None:
    assert labels_spec("clicked_impressions", 30) == "clicked_impressions:30"
    with pytest.raises(LabelSpecError, match="unknown training labels 'clicks:9'"):
        labels_sql("clicks:9")
    with pytest.raises(LabelSpecError, match="invalid literal"):
        labels_sql("clicked_impressions:soon")


def test_a_trainer_that_cannot_be_loaded_is_named() -> None:
    assert load_trainer("").spec == "myelin.trainers:logistic_regression"
    assert len(load_trainer("").source_sha256) == 64
    with pytest.raises(TrainerError, match="MODULE:FUNCTION"):
        load_trainer("myelin.trainers")
    with pytest.raises(TrainerError, match="cannot import no_such_module: ModuleNotFoundError"):
        load_trainer("no_such_module:train")
    with pytest.raises(TrainerError, match="has no function 'nope'"):
        load_trainer("myelin.trainers:nope")


def test_the_split_holds_out_the_newest_rows_and_the_schedule_ticks() -> None:
    split = time_split(1000, 0.2)
    assert (split.cut, split.rows) == (800, 1000)
    with pytest.raises(TrainerError, match=r"\(0, 1\)"):
        time_split(10, 1.0)
    assert due(0.0, 10.0, 10.0) and not due(0.0, 9.9, 10.0) and not due(0.0, 1e9, 0.0)
