"""The errors of a retrain, all :class:`RetrainError`::

RetrainError
 +-- NotRetrainable   the champion lacks what a retrain needs (view, features, labels)
 +-- TooFewRows       the bounded training set is too small or has one class
 +-- BoundNotStored   the features service / warehouse did not reach the bound in time
 +-- JobTakenOver     another process took the job over (it looked dead)
TrainerError (myelin.trainers): MYELIN_TRAINER cannot be loaded, or it failed
"""

from __future__ import annotations

from myelin.errors import MyelinError, Retryable


class RetrainError(MyelinError):
    code = "retrain_error"


class NotRetrainable(RetrainError):
    code = "not_retrainable"


class TooFewRows(RetrainError):
    code = "too_few_rows"


class BoundNotStored(RetrainError, Retryable):
    code = "bound_not_stored"


class JobTakenOver(RetrainError):
    code = "job_taken_over"
