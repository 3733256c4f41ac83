"""What the inference ledger keeps of a tensor (pure: numpy in, records out).

Values are kept, flattened, up to a size cap per tensor; past it only the shape, the size
and a SHA-256 of the bytes (enough to prove which input was served, not to replay it).
The work is proportional to the tensor: ~microseconds under the cap, ~1 ms per MB hashed.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import numpy.typing as npt

from myelin.records import TensorRecord
from services.inference.logic import NUMPY_TO_OIP


def _bytes_of(arr: npt.NDArray[Any]) -> bytes:
    if arr.dtype == object:  # BYTES tensors: the values themselves, length-prefixed
        parts = []
        for x in arr.ravel().tolist():
            b = x if isinstance(x, bytes) else str(x).encode()
            parts.append(len(b).to_bytes(4, "little") + b)
        return b"".join(parts)
    return np.ascontiguousarray(arr).tobytes()


def _datatype(arr: npt.NDArray[Any]) -> str:
    if arr.dtype == object:
        return "BYTES"
    return NUMPY_TO_OIP.get(np.dtype(arr.dtype.str.replace(">", "<")), str(arr.dtype))


def tensor_record(name: str, value: Any, cap_bytes: int) -> TensorRecord:
    arr = np.asarray(value)
    data = _bytes_of(arr)
    keep = len(data) <= cap_bytes
    values: list[Any] = []
    if keep:
        values = [
            x.decode("utf-8", "replace") if isinstance(x, bytes) else x
            for x in arr.ravel().tolist()
        ]
    return TensorRecord(
        name=name,
        datatype=_datatype(arr),
        shape=[int(d) for d in arr.shape],
        nbytes=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        values=values,
    )
