"""Scoring the challenger's ONNX model *and the champion's*, with onnxruntime, on exactly
the holdout rows: ``auc`` / ``logloss`` beside ``champion_auc`` / ``champion_logloss``,
and the challenger's drift reference of its training rows."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import pyarrow as pa

from myelin.drift import DriftPolicy, Reference, build_reference
from myelin.retraining.errors import TooFewRows
from myelin.trainers import Split, matrix


def score_onnx(onnx: bytes, x: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
    """P(label = 1) per row, as the inference service reads a model: the output named
    probabilities (or output_probability, probability), else the last; its column 1 when
    it has two or more."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(onnx, sess_options=opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    pick = next(
        (n for n in names if n in ("probabilities", "output_probability", "probability")),
        names[-1],
    )
    (out,) = sess.run([pick], {sess.get_inputs()[0].name: x})
    p = np.asarray(out, dtype=np.float64)
    if p.ndim == 2 and p.shape[1] >= 2:
        return p[:, 1]
    return p.reshape(-1)


def holdout_metrics(y: npt.NDArray[np.int64], p: npt.NDArray[np.float64]) -> tuple[float, float]:
    """(AUC, log loss) of scores ``p`` against labels ``y`` (scikit-learn's definitions)."""
    from sklearn.metrics import log_loss, roc_auc_score

    return float(roc_auc_score(y, p)), float(log_loss(y, p, labels=[0, 1]))


@dataclass(frozen=True)
class Evaluation:
    metrics: dict[str, float]
    reference: Reference


def evaluate(
    table: pa.Table,
    features: list[str],
    split: Split,
    challenger: bytes,
    champion: bytes,
    champion_features: list[str],
    policy: DriftPolicy | None = None,
) -> Evaluation:
    """The challenger and the champion on the same holdout rows; the challenger's drift
    reference from its training rows and its scores on them, judged by ``policy`` (the
    champion's: when a window counts as drifted is the model's setting, not the
    version's; the default policy when None)."""
    holdout = split.holdout(table)
    x, y = matrix(holdout, features)
    if len(np.unique(y)) < 2:
        raise TooFewRows(
            f"the {len(y)} holdout rows all have label {int(y[0]) if len(y) else '-'}: no AUC "
            "can be measured; retrain with a later bound or a larger MYELIN_RETRAIN_HOLDOUT_SHARE"
        )
    auc, logloss = holdout_metrics(y, score_onnx(challenger, x))
    xc, _ = matrix(holdout, champion_features)
    champion_auc, champion_logloss = holdout_metrics(y, score_onnx(champion, xc))
    x_train, y_train = matrix(split.train(table), features)
    reference = build_reference(features, x_train, score_onnx(challenger, x_train), policy=policy)
    y_all = table.column("label").to_numpy(zero_copy_only=False).astype(np.int64)
    return Evaluation(
        metrics={
            "auc": auc,
            "logloss": logloss,
            "champion_auc": champion_auc,
            "champion_logloss": champion_logloss,
            "positive_rate": float(np.mean(y_all)),
            "training_rows": float(len(y_train)),
            "holdout_rows": float(len(y)),
        },
        reference=reference,
    )
