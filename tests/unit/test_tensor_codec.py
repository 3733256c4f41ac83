from __future__ import annotations

import numpy as np
import pytest

from myelin.gen import grpc_predict_v2_pb2 as pb
from myelin.onnx_signature import onnx_shape
from services.inference.logic import (
    TensorError,
    decode_bytes_tensor,
    decode_input,
    encode_bytes_tensor,
    encode_output,
    feature_matrix,
    positive_scores,
)


def tensor(dt: str, shape: list[int]) -> pb.ModelInferRequest.InferInputTensor:
    return pb.ModelInferRequest.InferInputTensor(name="x", datatype=dt, shape=shape)


def test_raw_fp32_little_endian() -> None:
    a = np.arange(6, dtype="<f4").reshape(2, 3)
    out = decode_input(tensor("FP32", [2, 3]), a.tobytes(), "FP32")
    assert out.dtype == np.float32 and np.array_equal(out, a)


def test_typed_contents() -> None:
    t = tensor("INT64", [3])
    t.contents.int64_contents.extend([1, 2, 3])
    assert decode_input(t, None, None).tolist() == [1, 2, 3]


def test_bytes_tensors_round_trip() -> None:
    items = [b"", b"abc", "é".encode()]
    raw = encode_bytes_tensor(items)
    assert decode_bytes_tensor(raw) == items
    out = decode_input(tensor("BYTES", [3]), raw, None)
    assert out.tolist() == items
    with pytest.raises(TensorError, match="truncated"):
        decode_bytes_tensor(raw[:-1])


@pytest.mark.parametrize(
    ("t", "raw", "expected", "msg"),
    [
        (tensor("FP32", [2, 3]), b"\0" * 20, "FP32", "needs 24 raw bytes"),
        (tensor("FP64", [1]), b"\0" * 8, "FP32", "expects FP32"),
        (tensor("FP99", [1]), b"", None, "unknown datatype"),
        (tensor("FP32", [-2]), b"", None, "negative"),
        (tensor("FP32", [2]), None, None, "needs 2 elements, got 0"),
    ],
)
def test_bad_tensors_are_specific(
    t: pb.ModelInferRequest.InferInputTensor, raw: bytes | None, expected: str | None, msg: str
) -> None:
    with pytest.raises(TensorError, match=msg):
        decode_input(t, raw, expected)


def test_encode_output_raw_and_typed() -> None:
    a = np.array([[0.25, 0.75]], dtype=np.float32)
    t, blob = encode_output("p", a, raw=True)
    assert t.datatype == "FP32" and list(t.shape) == [1, 2]
    assert blob is not None and np.frombuffer(blob, "<f4").tolist() == [0.25, 0.75]
    t, blob = encode_output("label", np.array([1, 0], dtype=np.int64), raw=False)
    assert blob is None and t.datatype == "INT64" and list(t.contents.int64_contents) == [1, 0]


def test_feature_matrix_imputes_missing_as_zero() -> None:
    m = feature_matrix([(1.0, float("nan")), (float("inf"), 2.0)], 2)
    assert m.dtype == np.float32 and m.tolist() == [[1.0, 0.0], [0.0, 2.0]]


def test_helpers() -> None:
    assert onnx_shape([None, 3, "batch"]) == [-1, 3, -1]
    assert positive_scores(np.array([[0.1, 0.9], [0.8, 0.2]])) == pytest.approx([0.9, 0.2])
