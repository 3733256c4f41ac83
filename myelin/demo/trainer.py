"""Train a small CTR model on a training set read from the offline store; export ONNX.

The trainers live in :mod:`myelin.trainers` (shared with retraining); this module keeps
the demo's names."""

from __future__ import annotations

from myelin.trainers import Trained, matrix, train

__all__ = ["Trained", "matrix", "train"]
