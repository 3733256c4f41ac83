"""Retraining that is triggered, reproducible and governed.

A trigger (a ``DriftDetected`` record, a schedule, or ``myelin models retrain``) starts a
*job* that:

1. takes the model's champion as the parent: its feature view, features and how its
   labels were built (``labels["training_labels"]``, a builder of :mod:`myelin.training`);
2. fixes a **bound**, a sequence of the EVENTS stream (the stream's last one when the
   trigger gives none), waits until the features service has applied everything up to it
   and the warehouse has stored it, and builds the point-in-time training set bounded by
   it: the same bound gives the same rows whenever it is run, also after more events
   arrived; their SHA-256 (:func:`fingerprint`) is recorded;
3. trains with the configured trainer (``MYELIN_TRAINER``, :mod:`myelin.trainers`) on the
   older rows and holds the newest out (``MYELIN_RETRAIN_HOLDOUT_SHARE``);
4. scores the challenger's ONNX model *and the champion's*, with onnxruntime, on exactly
   those holdout rows: ``auc`` / ``logloss`` beside ``champion_auc`` / ``champion_logloss``;
5. registers the challenger with its lineage: provenance (training window, view version,
   features, rows, the bounded query, ``created_by = "retrain <job>"``, the champion's
   label source), labels (``origin=retrain``, job, trigger, bound, fingerprint, labels
   builder, trainer and the code that ran: package version, git commit, SHA-256 of the
   trainer's and of the training-set code) and a drift reference of its training rows;
6. asks governance to put it in **shadow**. A refusal is the job's outcome (``denied``),
   not an error. Canary and champion are later steps (:func:`advance`), each a governance
   decision (the promote policy wants a retrained version to go shadow -> canary ->
   champion, and no worse than the champion on the holdout).

Jobs are idempotent. A job's id comes from its trigger: a drift of version *v* of a
model is one job however many windows report it (``<model>.drift.v<v>``); a command or
schedule is one job per bound (``<model>.seq.<bound>``). Jobs live in NATS KV
(``myelin_retrains``); a trigger claims its job by creating the key, so of two triggers
only one trains, and the other gets the existing job. A running job refreshes its key
(heartbeat); one silent for ``MYELIN_RETRAIN_STALE_S`` (its process died) is taken over
by the next trigger. A failed job runs again on a trigger after ``MYELIN_RETRAIN_RETRY_S``
(at once when it failed for a transient cause), a finished one only when forced. Every
start, finish and turned-away trigger is an audit record (actions ``retrain_start``,
``retrain_finish``, ``retrain_skip``); governance audits its own decisions.

Errors (all :class:`RetrainError`)::

    RetrainError
     +-- NotRetrainable   the champion lacks what a retrain needs (view, features, labels)
     +-- TooFewRows       the bounded training set is too small or has one class
     +-- BoundNotStored   the features service / warehouse did not reach the bound in time
     +-- JobTakenOver     another process took the job over (it looked dead)
    TrainerError (myelin.trainers): MYELIN_TRAINER cannot be loaded, or it failed

Modules::

    errors         RetrainError and its subclasses (the tree above)
    jobs           Trigger, job ids, RetrainJob, who may take a job over, JobStore (KV)
    lineage        the training set's fingerprint and the code that ran
    evaluation     challenger and champion scored on the same holdout rows
    training_data  TrainingData: the bound, the view version, waiting until it is stored
    retrainer      Retrainer: runs a job from the champion to a challenger in shadow
    stages         advance: shadow -> canary -> champion
    command        myelin models retrain / retrains
"""

from myelin.retraining.command import list_jobs, retrain_command
from myelin.retraining.errors import (
    BoundNotStored,
    JobTakenOver,
    NotRetrainable,
    RetrainError,
    TooFewRows,
)
from myelin.retraining.evaluation import Evaluation, evaluate, holdout_metrics, score_onnx
from myelin.retraining.jobs import JobStateName as JobStateName
from myelin.retraining.jobs import (
    JobStore,
    RetrainJob,
    Trigger,
    drift_trigger,
    job_id,
    reclaimable,
)
from myelin.retraining.lineage import code_version, fingerprint
from myelin.retraining.retrainer import Outcome, Retrainer
from myelin.retraining.stages import advance
from myelin.retraining.training_data import NatsTrainingData, TrainingData

__all__ = [
    "BoundNotStored",
    "Evaluation",
    "JobStore",
    "JobTakenOver",
    "NatsTrainingData",
    "NotRetrainable",
    "Outcome",
    "RetrainError",
    "RetrainJob",
    "Retrainer",
    "TooFewRows",
    "TrainingData",
    "Trigger",
    "advance",
    "code_version",
    "drift_trigger",
    "evaluate",
    "fingerprint",
    "holdout_metrics",
    "job_id",
    "list_jobs",
    "reclaimable",
    "retrain_command",
    "score_onnx",
]
