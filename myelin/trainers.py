"""Trainers: a training set in, an ONNX model out. Pluggable (``MYELIN_TRAINER``).

The contract a retrain (:mod:`myelin.retraining`) relies on::

    def trainer(table: pa.Table, features: list[str], split: Split) -> Fitted

- ``table``: the point-in-time training set (:func:`myelin.training.training_set_sql`),
  ordered by time: ``entity_id``, ``ts``, ``label`` (0 / 1), ``features_as_of`` and one
  float column per feature. Read the matrix with :func:`matrix`, which imputes a missing
  value as 0, as serving does.
- ``split``: the rows to fit on (``table.slice(0, split.cut)``, :meth:`Split.train`); the
  rest is the holdout, which the trainer must not fit on: the job scores the returned
  ONNX model *and* the champion on exactly those rows and records both.
- ``Fitted.onnx``: one FP32 input ``[-1, len(features)]`` (features in the given order)
  and a probability output, ``probabilities`` ``[-1, 2]`` (column 1: P(label = 1)) or a
  score per row, as the inference service reads it.
- ``Fitted.metrics``: the trainer's own figures, kept beside the job's; the job's
  ``auc`` / ``logloss`` (measured on the ONNX model) win over a trainer's.

A trainer runs in a worker thread; it may take minutes. It should be deterministic: the
same rows give the same model (the default is: lbfgs from zeros, no sampling).
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa

from myelin.drift import Reference, build_reference
from myelin.errors import MyelinError
from myelin.models import TensorSpec

DEFAULT_TRAINER = "myelin.trainers:logistic_regression"
HOLDOUT_SHARE = 0.2


class TrainerError(MyelinError):
    code = "trainer_error"


@dataclass(frozen=True)
class Split:
    """A time-ordered split: rows ``[0, cut)`` are fitted on, ``[cut, rows)`` held out."""

    cut: int
    rows: int

    def train(self, table: pa.Table) -> pa.Table:
        return table.slice(0, self.cut)

    def holdout(self, table: pa.Table) -> pa.Table:
        return table.slice(self.cut)


def time_split(rows: int, holdout_share: float = HOLDOUT_SHARE) -> Split:
    """The last ``holdout_share`` of the rows (the newest) are held out."""
    if not 0.0 < holdout_share < 1.0:
        raise TrainerError(f"the holdout share is in (0, 1), got {holdout_share}")
    return Split(cut=int(rows * (1.0 - holdout_share)), rows=rows)


@dataclass(frozen=True)
class Fitted:
    """What a trainer returns (see the module docstring)."""

    onnx: bytes
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    metrics: dict[str, float] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)  # recorded as the version's labels


Trainer = Callable[[pa.Table, list[str], Split], Fitted]


def matrix(
    table: pa.Table, features: list[str]
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    x = np.column_stack(
        [
            np.nan_to_num(table.column(f).to_numpy(zero_copy_only=False).astype(np.float64))
            for f in features
        ]
    ).astype(np.float32)
    y = table.column("label").to_numpy(zero_copy_only=False).astype(np.int64)
    return x, y


def _fit_logistic(x: npt.NDArray[np.float32], y: npt.NDArray[np.int64]) -> Any:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model: Any = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    model.fit(x, y)
    return model


def _to_onnx(model: Any, width: int) -> bytes:
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType

    onx = convert_sklearn(
        model,
        initial_types=[("input", FloatTensorType([None, width]))],
        options={id(model.steps[-1][1]): {"zipmap": False}},
        target_opset=17,
    )
    data: bytes = onx.SerializeToString()
    return data


def _signature(width: int) -> tuple[list[TensorSpec], list[TensorSpec]]:
    return (
        [TensorSpec("input", "FP32", [-1, width])],
        [TensorSpec("label", "INT64", [-1]), TensorSpec("probabilities", "FP32", [-1, 2])],
    )


def logistic_regression(table: pa.Table, features: list[str], split: Split) -> Fitted:
    """The default trainer: logistic regression on standardized features (scikit-learn),
    exported to ONNX."""
    x, y = matrix(split.train(table), features)
    if len(np.unique(y)) < 2:
        raise TrainerError(
            f"the {len(y)} training rows all have label {int(y[0]) if len(y) else '-'}: "
            "a classifier needs both classes; widen the training window"
        )
    model = _fit_logistic(x, y)
    inputs, outputs = _signature(len(features))
    return Fitted(
        onnx=_to_onnx(model, len(features)),
        inputs=inputs,
        outputs=outputs,
        params={"estimator": "StandardScaler+LogisticRegression(max_iter=1000)"},
    )


# ---------------------------------------------------------------- the demo's API


@dataclass(frozen=True)
class Trained:
    onnx: bytes
    features: list[str]
    metrics: dict[str, float]
    train_rows: int
    test_rows: int
    window: tuple[int, int]
    max_abs_diff_vs_sklearn: float
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    reference: Reference  # the training rows' distributions, for drift (myelin.drift)


def train(
    table: pa.Table, features: list[str], *, shuffle_labels: bool = False, seed: int = 0
) -> Trained:
    """Time-ordered split (last 20% held out); logistic regression on standardized features."""
    from sklearn.metrics import log_loss, roc_auc_score

    if table.num_rows < 100:
        raise ValueError(f"only {table.num_rows} training rows; need at least 100")
    x, y = matrix(table, features)
    if shuffle_labels:
        y = np.random.default_rng(seed).permutation(y)
    cut = time_split(len(y)).cut
    model = _fit_logistic(x[:cut], y[:cut])
    p = model.predict_proba(x[cut:])[:, 1]
    metrics = {
        "auc": float(roc_auc_score(y[cut:], p)),
        "logloss": float(log_loss(y[cut:], p, labels=[0, 1])),
        "positive_rate": float(y.mean()),
    }
    data = _to_onnx(model, len(features))
    import onnxruntime as ort

    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    onnx_p = sess.run(None, {"input": x[cut:]})[1][:, 1]
    # drift is measured against what the model saw in training, scored as it is served
    reference = build_reference(features, x[:cut], sess.run(None, {"input": x[:cut]})[1][:, 1])
    diff = float(np.max(np.abs(onnx_p - p))) if len(p) else 0.0
    ts = table.column("ts").to_numpy(zero_copy_only=False).astype("datetime64[ms]").astype(np.int64)
    inputs, outputs = _signature(len(features))
    return Trained(
        onnx=data,
        features=features,
        metrics=metrics,
        train_rows=cut,
        test_rows=len(y) - cut,
        window=(int(ts.min()), int(ts.max())),
        max_abs_diff_vs_sklearn=diff,
        inputs=inputs,
        outputs=outputs,
        reference=reference,
    )


# ---------------------------------------------------------------- plugging one in


@dataclass(frozen=True)
class LoadedTrainer:
    spec: str  # "module:function"
    fn: Trainer
    source_sha256: str  # of the module that defines it: which code trained a version


def load_trainer(spec: str = "") -> LoadedTrainer:
    """``"package.module:function"`` (``MYELIN_TRAINER``; '' is the default trainer)."""
    spec = spec.strip() or DEFAULT_TRAINER
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise TrainerError(
            f"MYELIN_TRAINER={spec!r}: give it as MODULE:FUNCTION, e.g. {DEFAULT_TRAINER}"
        )
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - any import failure is a configuration error
        raise TrainerError(
            f"MYELIN_TRAINER={spec!r}: cannot import {module_name}: {type(exc).__name__}: {exc}"
        ) from None
    fn = getattr(module, attr, None)
    if fn is None or not callable(fn):
        raise TrainerError(f"MYELIN_TRAINER={spec!r}: {module_name} has no function {attr!r}")
    return LoadedTrainer(spec=spec, fn=fn, source_sha256=_source_sha256(module))


def _source_sha256(module: Any) -> str:
    try:
        path = inspect.getsourcefile(module)
    except TypeError:  # a built-in or extension module: no source to hash
        path = None
    if not path:
        return ""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
