"""The ML loop in the serving process, on real engines (nats-server, redis-server, regopy
governance, onnxruntime): shadow scoring on the champion's features, a sticky canary,
governed routes and rollback, drift counted per request and published as DriftDetected."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace

import grpc
import msgspec
import numpy as np
import numpy.typing as npt
import onnxruntime as ort
import pytest
from nats.aio.client import Client as NATS

from myelin import bus
from myelin.drift import DriftPolicy, Reference, build_reference, compare_all
from myelin.gen import myelin_predict_pb2 as mp
from myelin.gen import myelin_predict_pb2_grpc as mp_grpc
from myelin.models import ModelRegistry, PromotionDenied, RegistryError, Routes
from myelin.records import AuditRecord, DriftDetected, InferenceRecord, with_shadow_rows
from myelin.settings import Settings
from myelin.subjects import AUDIT_STREAM, DRIFT_STREAM, INFERENCES_STREAM
from services.inference.app import InferenceApp
from services.inference.routing import bucket
from tests.helpers import FEATURES, register, tiny_model
from tests.integration.conftest import USERS

pytestmark = pytest.mark.integration


async def _records(nc: NATS, settings: Settings, subject: str, stream: str, n: int) -> list[bytes]:
    """The messages of ``subject`` on ``stream``: at least ``n`` (waiting up to 10 s for
    them), and then whatever else is there."""
    js = bus.jetstream(nc, settings)
    sub = await js.pull_subscribe(subject, stream=stream)
    out: list[bytes] = []
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            out += [m.data for m in await sub.fetch(500, timeout=0.3)]
        except TimeoutError:
            if len(out) >= n:
                break
    await sub.unsubscribe()
    return out


async def _ledger(nc: NATS, settings: Settings, n: int) -> list[InferenceRecord]:
    """At least ``n`` records of the ledger (each message holds a batch)."""
    recs: list[InferenceRecord] = []
    deadline = time.monotonic() + 10
    while len(recs) < n and time.monotonic() < deadline:
        data = await _records(nc, settings, "myelin.inferences.>", INFERENCES_STREAM, 1)
        recs = [r for d in data for r in msgspec.msgpack.decode(d, type=list[InferenceRecord])]
    return with_shadow_rows(recs)  # as the ledger stores them


async def _predict(settings: Settings, users: list[str], prefix: str) -> list[mp.PredictResponse]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{settings.inference_grpc_port}") as ch:
        stub = mp_grpc.PredictorStub(ch)
        return [
            await stub.Predict(
                mp.PredictRequest(model_name="ctr", entity_ids=[u], request_id=f"{prefix}{u}")
            )
            for u in users
        ]


async def _wait_routes(inf: InferenceApp, want: Routes) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        table = inf.predictor.host.routes("ctr") if inf.predictor else None
        got = table.routes if table else Routes()
        if got == want and (not want.shadow or (table and table.shadow)):
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"inference did not follow the routes {want}")


async def test_a_shadow_is_scored_on_exactly_the_features_the_champion_was_served(
    serving: tuple[Settings, InferenceApp], nc: NATS
) -> None:
    s, inf = serving
    champion, shadow_model = tiny_model(0), tiny_model(7)
    await register(nc, s, champion)
    v2 = await register(nc, s, shadow_model, alias=None)
    reg = ModelRegistry(nc, bus.jetstream(nc, s))
    await reg.set_routes("ctr", shadow=v2, requester="test")
    await _wait_routes(inf, Routes(shadow=v2))
    users = [f"u{i}" for i in range(20)]
    responses = await _predict(s, users, "sh-")
    assert {r.model_version for r in responses} == {"1"}  # the client only sees the champion

    recs = await _ledger(nc, s, 40)
    by_route: dict[str, dict[str, InferenceRecord]] = {}
    for r in recs:
        by_route.setdefault(r.route, {})[r.request_id] = r
    assert set(by_route) == {"champion", "shadow"}
    assert by_route["champion"].keys() == by_route["shadow"].keys() == {f"sh-{u}" for u in users}
    sess = ort.InferenceSession(shadow_model.onnx, providers=["CPUExecutionProvider"])
    for rid, served in by_route["champion"].items():
        shadowed = by_route["shadow"][rid]
        assert (served.model_version, shadowed.model_version) == ("1", str(v2))
        assert shadowed.trace_id == served.trace_id
        [p], [q] = served.predictions, shadowed.predictions
        enc = msgspec.msgpack.encode  # NaN (no value yet) equals itself byte for byte
        assert enc(q.features) == enc(p.features) and q.feature_age_ms == p.feature_age_ms
        x = np.nan_to_num(np.array([[p.features[f] for f in FEATURES]], dtype=np.float32))
        assert q.score == pytest.approx(float(sess.run(None, {"input": x})[1][0, 1]), abs=1e-7)
    assert inf.shadows is not None and inf.shadows.scored == 20 and inf.shadows.dropped == 0


async def test_a_canary_takes_its_share_by_a_sticky_hash_and_rollback_is_one_call(
    serving: tuple[Settings, InferenceApp], nc: NATS
) -> None:
    s, inf = serving
    await register(nc, s, tiny_model(0))
    v2 = await register(nc, s, tiny_model(7), alias=None)
    reg = ModelRegistry(nc, bus.jetstream(nc, s))
    with pytest.raises(PromotionDenied, match="at most 50%"):
        await reg.set_routes("ctr", canary=v2, canary_share=0.9, requester="test")
    with pytest.raises(RegistryError, match="champion"):
        await reg.set_routes("ctr", canary=1, canary_share=0.1, requester="test")
    assert await reg.routes("ctr") == Routes()  # a refused move changed nothing
    await reg.set_routes("ctr", canary=v2, canary_share=0.3, requester="test")
    await _wait_routes(inf, Routes(canary=v2, canary_share=0.3))

    users = [f"u{i}" for i in range(USERS)]
    want = {u: str(v2) if bucket("ctr", u) < 0.3 else "1" for u in users}
    assert 5 < sum(v == str(v2) for v in want.values()) < 35  # both routes take traffic
    for attempt in ("a-", "b-"):  # sticky: the same entity, the same version
        got = {
            u: r.model_version
            for u, r in zip(users, await _predict(s, users, attempt), strict=True)
        }
        assert got == want
    recs = [r for r in await _ledger(nc, s, 2 * USERS) if r.request_id.startswith("a-")]
    assert {r.request_id[2:]: (r.route, r.model_version) for r in recs} == {
        u: ("canary" if v == str(v2) else "champion", v) for u, v in want.items()
    }

    previous = await reg.rollback("ctr", requester="test")
    assert previous == Routes(canary=v2, canary_share=0.3)
    await _wait_routes(inf, Routes())
    assert {r.model_version for r in await _predict(s, users, "c-")} == {"1"}
    audit = [
        msgspec.msgpack.decode(d, type=AuditRecord)
        for d in await _records(nc, s, "myelin.audit.>", AUDIT_STREAM, 1)
    ]
    routes = [a for a in audit if a.action == "promote" and a.subject == f"ctr:v{v2}"]
    assert [a.allow for a in routes] == [False, True]  # the 90% ask, then the 30% one
    [rollback] = [a for a in audit if a.action == "rollback"]
    assert rollback.allow and "test" in rollback.reasons[0]


async def test_drift_is_counted_per_request_and_published_when_it_breaches(
    serving: tuple[Settings, InferenceApp], nc: NATS
) -> None:
    """The per-version counters, judged at the window's end, give the figures that
    myelin.drift computes from the ledger's features-as-served (an independent path: the
    values recorded, binned again here); a breach is published as DriftDetected."""
    s, inf = serving
    t = tiny_model(0)  # trained on Poisson(3) counts: the served features are far from it
    ref = msgspec.structs.replace(t.reference, policy=DriftPolicy(min_samples=30))
    await register(nc, s, replace(t, reference=ref))
    users = [f"u{i}" for i in range(USERS)]
    assert inf.drift is not None
    await inf.drift.evaluate()  # the window so far (warm-up only) is judged away
    await _predict(s, users, "d-")
    [found] = await inf.drift.evaluate()

    recs = [r for r in await _ledger(nc, s, USERS) if r.request_id.startswith("d-")]
    assert len(recs) == USERS
    x = np.array([[r.predictions[0].features[f] for f in FEATURES] for r in recs], np.float32)
    scores = np.array([r.predictions[0].score for r in recs])
    want = compare_all(ref, counts_of(ref, np.nan_to_num(x), scores))
    assert found.samples == USERS and found.model_version == "1"
    for got, w in zip(found.columns, want, strict=True):
        assert msgspec.structs.asdict(got) == msgspec.structs.asdict(w)  # the same counts
    assert found.drifted == [w.feature for w in want if w.breached] and found.drifted

    [published] = [
        msgspec.msgpack.decode(d, type=DriftDetected)
        for d in await _records(nc, s, "myelin.drift.>", DRIFT_STREAM, 1)
    ]
    assert published == found
    assert inf.status()["drift_detected"] == {"ctr:v1": 1}

    # served traffic that looks like the training set does not drift: a reference built
    # from these very rows
    same = build_reference(FEATURES, x, scores, policy=DriftPolicy(min_samples=30))
    assert not any(c.breached for c in compare_all(same, counts_of(same, x, scores)))
    # fewer rows than min_samples: not judged, carried into the next window
    await _predict(s, users[:10], "e-")
    assert await inf.drift.evaluate() == []
    assert inf.drift.pending_rows() == {"ctr:v1": 10}


def counts_of(
    ref: Reference, x: npt.NDArray[np.float32], scores: npt.NDArray[np.float64]
) -> list[list[int]]:
    """Values per reference bin, counted here with numpy (not the server's counters)."""
    cols = [x[:, j] for j in range(x.shape[1])] + [scores]
    return [
        np.bincount(np.searchsorted(b.edges, c), minlength=len(b.counts)).tolist()
        for b, c in zip(ref.bins, cols, strict=True)
    ]
