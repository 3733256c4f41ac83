"""An ONNX model's input and output signature in Open Inference Protocol terms (datatype
names, -1 for a dimension that is symbolic or unknown), shared by the registry's clients
and the inference service."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from myelin.models import TensorSpec

ONNX_TO_OIP = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}


def onnx_shape(dims: Sequence[int | str | None]) -> list[int]:
    """ONNX symbolic / unknown dims become -1, as OIP metadata expects."""
    return [d if isinstance(d, int) and d >= 0 else -1 for d in dims]


def signature(session: Any) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """The inputs and outputs of an ``onnxruntime.InferenceSession``."""
    return (
        [
            TensorSpec(i.name, ONNX_TO_OIP.get(i.type, i.type), onnx_shape(i.shape))
            for i in session.get_inputs()
        ],
        [
            TensorSpec(o.name, ONNX_TO_OIP.get(o.type, o.type), onnx_shape(o.shape))
            for o in session.get_outputs()
        ],
    )
