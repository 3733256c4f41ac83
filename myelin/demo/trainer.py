"""Train a small CTR model on a training set read from the offline store; export ONNX."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa

from myelin.models import TensorSpec


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


def train(
    table: pa.Table, features: list[str], *, shuffle_labels: bool = False, seed: int = 0
) -> Trained:
    """Time-ordered split (last 20% held out); logistic regression on standardized features."""
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import log_loss, roc_auc_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if table.num_rows < 100:
        raise ValueError(f"only {table.num_rows} training rows; need at least 100")
    x, y = matrix(table, features)
    if shuffle_labels:
        y = np.random.default_rng(seed).permutation(y)
    cut = int(len(y) * 0.8)
    model: Any = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    model.fit(x[:cut], y[:cut])
    p = model.predict_proba(x[cut:])[:, 1]
    metrics = {
        "auc": float(roc_auc_score(y[cut:], p)),
        "logloss": float(log_loss(y[cut:], p, labels=[0, 1])),
        "positive_rate": float(y.mean()),
    }
    onx = convert_sklearn(
        model,
        initial_types=[("input", FloatTensorType([None, len(features)]))],
        options={id(model.steps[-1][1]): {"zipmap": False}},
        target_opset=17,
    )
    data = onx.SerializeToString()
    import onnxruntime as ort

    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    onnx_p = sess.run(None, {"input": x[cut:]})[1][:, 1]
    diff = float(np.max(np.abs(onnx_p - p))) if len(p) else 0.0
    ts = table.column("ts").to_numpy(zero_copy_only=False).astype("datetime64[ms]").astype(np.int64)
    return Trained(
        onnx=data,
        features=features,
        metrics=metrics,
        train_rows=cut,
        test_rows=len(y) - cut,
        window=(int(ts.min()), int(ts.max())),
        max_abs_diff_vs_sklearn=diff,
        inputs=[TensorSpec("input", "FP32", [-1, len(features)])],
        outputs=[TensorSpec("label", "INT64", [-1]), TensorSpec("probabilities", "FP32", [-1, 2])],
    )
