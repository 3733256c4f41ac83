"""Pure inference logic: OIP tensor decoding / encoding, ONNX type mapping, feature rows.

No I/O here. Errors are :class:`TensorError` (-> gRPC INVALID_ARGUMENT).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from myelin.errors import MyelinError
from myelin.gen import grpc_predict_v2_pb2 as pb

if TYPE_CHECKING:
    from myelin.models import TensorSpec


class TensorError(MyelinError):
    code = "invalid_tensor"


OIP_TO_NUMPY: dict[str, np.dtype[np.generic]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "BYTES": np.dtype(np.object_),
}


NUMPY_TO_OIP = {v: k for k, v in OIP_TO_NUMPY.items() if k != "BYTES"}

_CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


def _check_shape(name: str, shape: list[int]) -> int:
    if any(d < 0 for d in shape):
        raise TensorError(f"input {name!r}: shape {shape} has a negative dimension")
    return math.prod(shape)


def decode_bytes_tensor(raw: bytes) -> list[bytes]:
    """Raw BYTES: each element is a 4-byte little-endian length, then the bytes."""
    out: list[bytes] = []
    i = 0
    while i < len(raw):
        if i + 4 > len(raw):
            raise TensorError("truncated length prefix in a raw BYTES tensor")
        (n,) = struct.unpack_from("<I", raw, i)
        i += 4
        if i + n > len(raw):
            raise TensorError("truncated element in a raw BYTES tensor")
        out.append(raw[i : i + n])
        i += n
    return out


def encode_bytes_tensor(items: Sequence[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(b)) + b for b in items)


def decode_input(
    tensor: pb.ModelInferRequest.InferInputTensor, raw: bytes | None, expected: str | None
) -> npt.NDArray[np.generic]:
    """One input tensor as a numpy array of the declared shape and datatype."""
    dt = tensor.datatype
    if dt not in OIP_TO_NUMPY:
        raise TensorError(f"input {tensor.name!r}: unknown datatype {dt!r}")
    if expected is not None and dt != expected:
        raise TensorError(f"input {tensor.name!r}: the model expects {expected}, got {dt}")
    shape = list(tensor.shape)
    count = _check_shape(tensor.name, shape)
    if dt == "BYTES":
        items = (
            decode_bytes_tensor(raw) if raw is not None else list(tensor.contents.bytes_contents)
        )
        if len(items) != count:
            raise TensorError(
                f"input {tensor.name!r}: shape {shape} needs {count} elements, got {len(items)}"
            )
        return np.array(items, dtype=np.object_).reshape(shape)
    npdt = OIP_TO_NUMPY[dt]
    if raw is not None:
        if len(raw) != count * npdt.itemsize:
            raise TensorError(
                f"input {tensor.name!r}: shape {shape} of {dt} needs {count * npdt.itemsize} raw bytes, "
                f"got {len(raw)}"
            )
        return np.frombuffer(raw, dtype=npdt).reshape(shape)
    if dt == "FP16":
        raise TensorError(f"input {tensor.name!r}: FP16 must be sent as raw_input_contents")
    values = getattr(tensor.contents, _CONTENTS_FIELD[dt])
    if len(values) != count:
        raise TensorError(
            f"input {tensor.name!r}: shape {shape} needs {count} elements, got {len(values)}"
        )
    return np.asarray(values, dtype=npdt).reshape(shape)


def encode_output(
    name: str, array: npt.NDArray[np.generic], raw: bool
) -> tuple[pb.ModelInferResponse.InferOutputTensor, bytes | None]:
    arr = np.asarray(array)
    if arr.dtype == np.object_ or arr.dtype.kind in "US":
        dt = "BYTES"
        items = [x if isinstance(x, bytes) else str(x).encode() for x in arr.reshape(-1)]
        out = pb.ModelInferResponse.InferOutputTensor(name=name, datatype=dt, shape=list(arr.shape))
        if raw:
            return out, encode_bytes_tensor(items)
        out.contents.bytes_contents.extend(items)
        return out, None
    le = arr.dtype.newbyteorder("<") if arr.dtype.byteorder == ">" else arr.dtype
    odt = NUMPY_TO_OIP.get(np.dtype(le))
    if odt is None:
        raise TensorError(f"output {name!r} has unsupported dtype {arr.dtype}")
    out = pb.ModelInferResponse.InferOutputTensor(name=name, datatype=odt, shape=list(arr.shape))
    if raw or odt == "FP16":
        return out, np.ascontiguousarray(arr, dtype=le).tobytes()
    getattr(out.contents, _CONTENTS_FIELD[odt]).extend(arr.reshape(-1).tolist())
    return out, None


def feature_matrix(rows: Sequence[Sequence[float]], width: int) -> npt.NDArray[np.float32]:
    """Entity feature rows -> float32 [n, width]; missing values (NaN) become 0, the same
    imputation the training set uses (an ASOF miss reads as 0)."""
    m = np.array(rows, dtype=np.float32).reshape(len(rows), width)
    bad = ~np.isfinite(m)  # (np.nan_to_num costs ~10x more on the small matrices served)
    if bad.any():
        m[bad] = 0.0
    return m


def probabilities(specs: Sequence[TensorSpec], outputs: Sequence[Any]) -> npt.NDArray[np.float64]:
    """The probability output of a classifier (by its usual names), else the last output."""
    for spec, value in zip(specs, outputs, strict=True):
        if spec.name in ("probabilities", "output_probability", "probability"):
            return np.asarray(value, dtype=np.float64)
    return np.asarray(outputs[-1], dtype=np.float64)


def positive_scores(probabilities: npt.NDArray[np.generic]) -> list[float]:
    """The positive-class column of a [n, 2] probability output (or a [n] score vector)."""
    p = np.asarray(probabilities, dtype=np.float64)
    if p.ndim == 2 and p.shape[1] >= 2:
        return p[:, 1].tolist()  # type: ignore[no-any-return,unused-ignore]
    return p.reshape(-1).tolist()  # type: ignore[no-any-return,unused-ignore]


def zeros_feeds(inputs: Sequence[TensorSpec]) -> dict[str, npt.NDArray[Any]]:
    """One input of zeros per tensor of a model's signature (unknown dims become 1), to run
    a model once before it takes traffic."""
    feeds: dict[str, npt.NDArray[Any]] = {}
    for spec in inputs:
        shape = [d if d > 0 else 1 for d in spec.shape]
        dtype = OIP_TO_NUMPY.get(spec.datatype)
        if dtype is None:
            raise TensorError(f"input {spec.name!r}: unknown datatype {spec.datatype!r}")
        if spec.datatype == "BYTES":
            feeds[spec.name] = np.full(shape, "", dtype=np.object_)
        else:
            feeds[spec.name] = np.zeros(shape, dtype=dtype)
    return feeds
