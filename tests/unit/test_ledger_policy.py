"""The inference ledger's rules, as pure logic: a request id is recorded once per model,
a full queue drops (and counts) instead of failing the request, tensors are kept up to a
cap and hashed beyond it."""

from __future__ import annotations

import asyncio
import hashlib

import numpy as np

from myelin.records import InferenceRecord
from services.inference.ledger import tensor_record
from services.inference.recorder import Recorder


def rec(request_id: str, model: str = "ctr") -> InferenceRecord:
    return InferenceRecord(
        request_id=request_id,
        ts_ms=1,
        api="predict",
        model=model,
        model_version="1",
        alias="champion",
        latency_us=1,
        trace_id="",
    )


def recorder(max_queued: int) -> Recorder:
    # never started: nothing is published, the queue is the subject
    return Recorder(publisher=None, max_queued=max_queued)  # type: ignore[arg-type]


def test_a_request_id_is_recorded_once_per_model() -> None:
    async def run() -> Recorder:
        r = recorder(10)
        for rid, model in [("a", "ctr"), ("a", "ctr"), ("a", "other"), ("b", "ctr")]:
            r.record(rec(rid, model))
        return r

    r = asyncio.run(run())
    assert (r.queued, r.deduplicated, r.dropped) == (3, 1, 0)


def test_a_full_queue_drops_and_counts_never_raises() -> None:
    """On main a full queue raised Overloaded: the request failed (RESOURCE_EXHAUSTED)."""

    async def run() -> Recorder:
        r = recorder(3)
        for i in range(5):
            r.record(rec(f"r{i}"))
        return r

    r = asyncio.run(run())
    assert (r.queued, r.dropped) == (3, 2) and r.nearly_full
    r.record(rec("r0"))  # the first ones were queued: a repeat of them is a duplicate
    assert r.deduplicated == 1


def test_tensors_are_kept_up_to_the_cap_and_hashed_beyond() -> None:
    small = np.arange(6, dtype=np.float32).reshape(2, 3)
    t = tensor_record("input", small, cap_bytes=1024)
    assert (t.datatype, t.shape, t.nbytes) == ("FP32", [2, 3], 24)
    assert t.values == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    assert t.sha256 == hashlib.sha256(small.tobytes()).hexdigest()
    big = np.ones((64, 64), dtype=np.float64)
    t = tensor_record("input", big, cap_bytes=1024)
    assert (t.values, t.nbytes) == ([], 64 * 64 * 8)
    assert t.sha256 == hashlib.sha256(big.tobytes()).hexdigest()
    words = tensor_record("text", np.array([b"ab", b"c"], dtype=object), cap_bytes=1024)
    assert (words.datatype, words.values) == ("BYTES", ["ab", "c"])
