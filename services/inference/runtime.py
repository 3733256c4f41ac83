"""Outbound adapter: onnxruntime sessions with explicit thread settings."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from myelin.models import TensorSpec
from myelin.onnx_signature import signature
from services.inference.logic import zeros_feeds


@dataclass(frozen=True)
class OrtModel:
    session: Any
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]

    def run(
        self, feeds: dict[str, npt.NDArray[Any]], outputs: list[str] | None = None
    ) -> list[Any]:
        result: list[Any] = self.session.run(outputs, feeds)
        return result

    def run_one(self, x: npt.NDArray[np.float32]) -> list[Any]:
        return self.run({self.inputs[0].name: x})

    def warm_up(self) -> None:
        """One inference on zeros of the input signature: onnxruntime allocates its buffers
        and finishes kernel set-up on a session's first run, which would otherwise land on
        the first request."""
        self.run(zeros_feeds(self.inputs))


def load_onnx(data: bytes, intra_threads: int, inter_threads: int) -> OrtModel:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = intra_threads
    opts.inter_op_num_threads = inter_threads
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(data, sess_options=opts, providers=["CPUExecutionProvider"])
    inputs, outputs = signature(sess)
    return OrtModel(sess, inputs, outputs)
