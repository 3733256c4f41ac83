"""``myelin demo``: start the embedded stack, push a clickstream through ingest, wait
for features, train a model from the offline store, register and promote it through
governance, score entities over gRPC and report what was measured."""

from __future__ import annotations

import asyncio
import shutil
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TextIO

import aiohttp
import grpc
import msgspec
import numpy as np
import pyarrow as pa

from myelin import bus, sql_client
from myelin.demo.generator import CLICK_WINDOW_S, generate
from myelin.demo.progress import Progress
from myelin.demo.trainer import Trained, train
from myelin.gen import grpc_predict_v2_pb2 as oip
from myelin.gen import grpc_predict_v2_pb2_grpc as oip_grpc
from myelin.gen import myelin_predict_pb2 as mp
from myelin.gen import myelin_predict_pb2_grpc as mp_grpc
from myelin.models import LabelSource, ModelRegistry, PromotionDenied, Provenance
from myelin.settings import Settings
from myelin.sql_client import wait_stored
from myelin.stack.process import free_port
from myelin.stack.supervisor import Stack, with_ports
from myelin.subjects import EVENTS_STREAM, FEATURES_STREAM, health_subject
from myelin.training import clicked_impressions_sql, labels_spec, training_set_sql

VIEW = "user_activity"
FEATURES = [
    "impressions_10m",
    "clicks_10m",
    "ctr_10m",
    "impressions_1h",
    "clicks_1h",
    "ctr_1h",
    "purchases_1h",
    "spend_1h",
]
MODEL = "ctr"
ANALYST_SQL = """SELECT toString(toStartOfInterval(event_time, INTERVAL 30 MINUTE)) AS half_hour,
       countIf(type = 'impression') AS impressions,
       countIf(type = 'click') AS clicks,
       round(clicks / impressions, 3) AS ctr,
       round(sumIf(JSONExtractFloat(data, 'amount'), type = 'purchase'), 2) AS revenue_eur
FROM myelin.events FINAL
GROUP BY half_hour ORDER BY half_hour"""


@dataclass
class DemoReport:
    events_sent: int = 0
    accepted: int = 0
    duplicates: int = 0
    rejected: int = 0
    rejected_by_reason: dict[str, int] = field(default_factory=dict)
    ingest_s: float = 0.0
    features_caught_up_s: float = 0.0
    feature_rows: int = 0
    entities: int = 0
    late: int = 0
    training_rows: int = 0
    model_version: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    onnx_vs_sklearn_max_diff: float = 0.0
    denied_model: str = ""
    denied_status: str = ""
    denied_promotion: str = ""
    predictions: int = 0
    predict_requests: int = 0
    predict_p50_ms: float = 0.0
    predict_p99_ms: float = 0.0
    predict_rps: float = 0.0
    batch100_p50_ms: float = 0.0
    batch100_p99_ms: float = 0.0
    oip_max_abs_diff: float = 0.0
    inference_rows: int = 0
    audit_rows: dict[str, int] = field(default_factory=dict)
    dlq_rows: int = 0
    trace_chain: dict[str, str] = field(default_factory=dict)
    analyst_sql: str = ANALYST_SQL
    analyst_rows: list[dict[str, Any]] = field(default_factory=list)
    events_in_clickhouse: int = 0


async def sql(nc: Any, query: str, *, arrow: bool = False, max_rows: int = 10_000_000) -> Any:
    if arrow:
        return await sql_client.query(nc, query, max_rows=max_rows)
    return await sql_client.query_rows(nc, query, max_rows=max_rows)


async def _post(http: aiohttp.ClientSession, url: str, body: bytes) -> dict[str, Any]:
    while True:
        async with http.post(url, data=body, headers={"Content-Type": "application/json"}) as r:
            data: dict[str, Any] = await r.json()
            if r.status == 429:  # back-pressure: wait and send the same batch again
                await asyncio.sleep(float(r.headers.get("Retry-After", "1")))
                continue
            if r.status not in (200, 207, 422):
                raise RuntimeError(f"ingest answered {r.status}: {data}")
            return data


async def ingest(
    settings: Settings, events: list[dict[str, Any]], report: DemoReport, out: TextIO
) -> None:
    url = f"http://127.0.0.1:{settings.ingest_http_port}/v1/events"
    enc = msgspec.json.Encoder()
    batch = 2000
    bodies = [enc.encode(events[i : i + batch]) for i in range(0, len(events), batch)]
    prog = Progress("ingest (HTTP batches)", len(events), "events", out)
    sem = asyncio.Semaphore(4)
    async with aiohttp.ClientSession() as http:

        async def send(body: bytes, n: int) -> None:
            async with sem:
                res = await _post(http, url, body)
            report.accepted += res["accepted"]
            report.duplicates += res["duplicates"]
            report.rejected += res["rejected"]
            for r in res["results"]:
                if r["status"] == "rejected":
                    report.rejected_by_reason[r["reason"]] = (
                        report.rejected_by_reason.get(r["reason"], 0) + 1
                    )
            prog.update(n)

        await asyncio.gather(
            *(send(b, min(batch, len(events) - i * batch)) for i, b in enumerate(bodies))
        )
        report.ingest_s = prog.close()
        # A producer retry of an already-sent batch: every event comes back "duplicate".
        res = await _post(http, url, bodies[0])
        report.duplicates += res["duplicates"]


async def wait_features(
    nc: Any, settings: Settings, out: TextIO, timeout_s: float = 300.0
) -> dict[str, Any]:
    js = bus.jetstream(nc, settings)
    last = (await js.stream_info(EVENTS_STREAM)).state.last_seq
    prog = Progress("features catch up", last, "events", out)
    seen = 0
    deadline = time.monotonic() + timeout_s
    while True:
        h: dict[str, Any] = msgspec.json.decode(
            await bus.request(nc, health_subject("features"), {})
        )
        prog.update(h["position"] - seen)
        seen = h["position"]
        if seen >= last:
            prog.close()
            # ... and the warehouse has stored the raw events and the feature values
            features_last = (await js.stream_info(FEATURES_STREAM)).state.last_seq
            await wait_stored(nc, events_seq=last, features_seq=features_last, timeout=timeout_s)
            return h
        if time.monotonic() > deadline:
            raise TimeoutError(f"features reached {seen} of {last} in {timeout_s}s")
        await asyncio.sleep(0.2)


async def register(
    nc: Any,
    settings: Settings,
    t: Trained,
    view_hash: str,
    query: str,
    labels: dict[str, str] | None = None,
) -> int:
    reg = ModelRegistry(nc, bus.jetstream(nc, settings))
    mv = await reg.register(
        MODEL,
        t.onnx,
        inputs=t.inputs,
        outputs=t.outputs,
        metrics=t.metrics,
        labels=labels,
        reference=t.reference,
        provenance=Provenance(
            training_window=list(t.window),
            feature_views=[f"{VIEW}@{view_hash}"],
            feature_view=VIEW,
            features=t.features,
            training_rows=t.train_rows,
            training_query=query.strip(),
            created_by="myelin demo",
            # outcomes: a click by the user within a minute of the score (myelin.quality)
            label_source=LabelSource(kind="event", event_type="click", window_s=60),
        ),
    )
    return mv.version


def _pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q)) if xs else 0.0


async def score(settings: Settings, users: list[str], report: DemoReport, out: TextIO) -> None:
    target = f"127.0.0.1:{settings.inference_grpc_port}"
    async with grpc.aio.insecure_channel(target) as ch:
        stub = mp_grpc.PredictorStub(ch)
        n = min(4000, max(len(users) * 2, 100))
        prog = Progress("predict (1 entity)", n, "requests", out)
        lat: list[float] = []
        sem = asyncio.Semaphore(32)

        async def one(i: int) -> None:
            async with sem:
                t0 = time.perf_counter()
                r = await stub.Predict(
                    mp.PredictRequest(model_name=MODEL, entity_ids=[users[i % len(users)]])
                )
                lat.append((time.perf_counter() - t0) * 1000)
                report.predictions += len(r.predictions)
                prog.update(1)

        t0 = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(n)))
        elapsed = time.perf_counter() - t0
        prog.close()
        report.predict_requests = n
        report.predict_rps = n / elapsed
        report.predict_p50_ms, report.predict_p99_ms = _pct(lat, 50), _pct(lat, 99)
        blat: list[float] = []
        for i in range(50):
            ids = [users[(i * 100 + j) % len(users)] for j in range(100)]
            t1 = time.perf_counter()
            r = await stub.Predict(mp.PredictRequest(model_name=MODEL, entity_ids=ids))
            blat.append((time.perf_counter() - t1) * 1000)
            report.predictions += len(r.predictions)
        report.batch100_p50_ms, report.batch100_p99_ms = _pct(blat, 50), _pct(blat, 99)


async def oip_parity(settings: Settings, t: Trained, x: np.ndarray[Any, Any]) -> float:
    """ModelInfer (raw tensors, as Triton clients send) vs onnxruntime in this process."""
    import onnxruntime as ort

    direct = ort.InferenceSession(t.onnx, providers=["CPUExecutionProvider"]).run(
        None, {"input": x}
    )[1]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{settings.inference_grpc_port}") as ch:
        stub = oip_grpc.GRPCInferenceServiceStub(ch)
        req = oip.ModelInferRequest(model_name=MODEL, id="parity")
        req.inputs.append(
            oip.ModelInferRequest.InferInputTensor(
                name="input", datatype="FP32", shape=list(x.shape)
            )
        )
        req.outputs.append(oip.ModelInferRequest.InferRequestedOutputTensor(name="probabilities"))
        req.raw_input_contents.append(x.astype("<f4").tobytes())
        resp = await stub.ModelInfer(req)
    served = np.frombuffer(resp.raw_output_contents[0], dtype="<f4").reshape(
        list(resp.outputs[0].shape)
    )
    return float(np.max(np.abs(served - direct)))


async def wait_rows(nc: Any, query: str, at_least: int, timeout_s: float = 60.0) -> int:
    deadline = time.monotonic() + timeout_s
    while True:
        n = int((await sql(nc, query))[0]["n"])
        if n >= at_least or time.monotonic() > deadline:
            return n
        await asyncio.sleep(0.3)


async def run_demo(settings: Settings, n_events: int, out: TextIO = sys.stderr) -> DemoReport:
    report = DemoReport()
    now = int(time.time() * 1000)
    print(f"Generating {n_events:,} clickstream events ...", file=out, flush=True)
    stream = generate(n_events, now)
    report.events_sent = len(stream.events) + len(stream.bad)
    async with Stack(settings, log=lambda m: print("  " + m, file=out, flush=True)):
        nc = await bus.connect(settings, "demo")
        try:
            print("Ingesting ...", file=out, flush=True)
            await ingest(settings, stream.events, report, out)
            bad = await _post_bad(settings, stream.bad)
            report.rejected += bad["rejected"]
            for r in bad["results"]:
                report.rejected_by_reason[r["reason"]] = (
                    report.rejected_by_reason.get(r["reason"], 0) + 1
                )
            t0 = time.perf_counter()
            health = await wait_features(nc, settings, out)
            report.features_caught_up_s = time.perf_counter() - t0
            report.feature_rows, report.late = health["feature_rows"], health["late"]
            view_hash = health["view_hash"]

            print("Building a point-in-time training set from ClickHouse ...", file=out, flush=True)
            query = training_set_sql(
                VIEW, FEATURES, clicked_impressions_sql(CLICK_WINDOW_S), version=view_hash
            )
            table: pa.Table = await sql(nc, query, arrow=True)
            report.training_rows = table.num_rows
            report.entities = int(
                (
                    await sql(
                        nc,
                        f"SELECT uniqExact(entity_id) AS n FROM myelin.feature_values "
                        f"WHERE view = '{VIEW}'",
                    )
                )[0]["n"]
            )
            print(
                f"  {table.num_rows:,} labelled impressions; training logistic regression ...",
                file=out,
                flush=True,
            )
            trained = await asyncio.to_thread(train, table, FEATURES)
            report.metrics = trained.metrics
            report.onnx_vs_sklearn_max_diff = trained.max_abs_diff_vs_sklearn
            # how its labels were built, so that a retrain (on drift) can rebuild them
            spec = {"training_labels": labels_spec("clicked_impressions", CLICK_WINDOW_S)}
            report.model_version = await register(nc, settings, trained, view_hash, query, spec)
            reg = ModelRegistry(nc, bus.jetstream(nc, settings))
            await reg.set_alias(MODEL, "champion", report.model_version, requester="demo")
            print(
                f"  registered {MODEL} v{report.model_version} (AUC {trained.metrics['auc']:.3f}) "
                "and promoted it to champion (governance allowed)",
                file=out,
                flush=True,
            )

            # A model trained on shuffled labels: governance must keep it out of service.
            noise = await asyncio.to_thread(train, table, FEATURES, shuffle_labels=True)
            noise_v = await register(nc, settings, noise, view_hash, query)
            try:
                await reg.set_alias(MODEL, "champion", noise_v, requester="demo")
            except PromotionDenied as exc:
                print(
                    f"  promotion of v{noise_v} to champion denied: {exc.message}",
                    file=out,
                    flush=True,
                )
            # The promote policy includes every serving rule: even the challenger alias is
            # refused to a model that may not be served, before it takes effect.
            try:
                await reg.set_alias(MODEL, "challenger", noise_v, requester="demo")
                report.denied_promotion = "ALLOWED (unexpected)"
            except PromotionDenied as exc:
                report.denied_promotion = exc.message
            report.denied_model = f"{MODEL} v{noise_v} (AUC {noise.metrics['auc']:.3f})"
            async with grpc.aio.insecure_channel(f"127.0.0.1:{settings.inference_grpc_port}") as ch:
                try:  # asked for by version: serving it is refused too
                    await mp_grpc.PredictorStub(ch).Predict(
                        mp.PredictRequest(
                            model_name=MODEL, model_version=str(noise_v), entity_ids=["user-00001"]
                        )
                    )
                    report.denied_status = "SERVED (unexpected)"
                except grpc.aio.AioRpcError as err:
                    report.denied_status = f"{err.code().name}: {err.details()}"

            print("Scoring over gRPC ...", file=out, flush=True)
            users = sorted({e["data"]["user_id"] for e in stream.events})
            await score(settings, users, report, out)
            x = _first_rows(table, 256)
            report.oip_max_abs_diff = await oip_parity(settings, trained, x)

            expected = report.predictions
            report.inference_rows = await wait_rows(
                nc,
                "SELECT count() AS n FROM myelin.inferences FINAL WHERE api = 'predict'",
                expected,
            )
            await wait_rows(nc, "SELECT count() AS n FROM myelin.dead_letters FINAL", 1)
            report.dlq_rows = int(
                (await sql(nc, "SELECT count() AS n FROM myelin.dead_letters FINAL"))[0]["n"]
            )
            for row in await sql(
                nc,
                "SELECT concat(action, if(allow, ':allow', ':deny')) AS k, count() AS n "
                "FROM myelin.audit FINAL GROUP BY k ORDER BY k",
            ):
                report.audit_rows[row["k"]] = int(row["n"])
            report.events_in_clickhouse = int(
                (await sql(nc, "SELECT count() AS n FROM myelin.events FINAL"))[0]["n"]
            )
            chain = await sql(
                nc,
                """
                SELECT e.trace_id AS trace_id, e.event_id AS event_id, e.type AS type,
                       f.stream_seq AS feature_seq, i.request_id AS inference_request
                FROM myelin.inferences AS i
                INNER JOIN myelin.events AS e ON e.trace_id = i.source_trace_id
                INNER JOIN myelin.feature_values AS f ON f.trace_id = e.trace_id AND f.entity_id = e.entity_id
                WHERE i.api = 'predict' AND i.source_trace_id != '' LIMIT 1""",
            )
            if chain:
                report.trace_chain = {k: str(v) for k, v in chain[0].items()}
            report.analyst_rows = await sql(nc, ANALYST_SQL)
        finally:
            await nc.close()
    return report


async def _post_bad(settings: Settings, bad: list[Any]) -> dict[str, Any]:
    async with aiohttp.ClientSession() as http:
        return await _post(
            http,
            f"http://127.0.0.1:{settings.ingest_http_port}/v1/events",
            msgspec.json.encode(bad),
        )


def _first_rows(table: pa.Table, n: int) -> np.ndarray[Any, Any]:
    from myelin.demo.trainer import matrix

    x, _ = matrix(table.slice(0, n), FEATURES)
    return x


def demo_settings(base: Settings, state_dir: Path | None = None) -> Settings:
    """Fresh state and free ports, so the demo never collides with a running stack."""
    state = state_dir or base.state_dir / "demo"
    shutil.rmtree(state, ignore_errors=True)
    return with_ports(
        replace(base, state_dir=state),
        nats_port=free_port(),
        redis_port=free_port(),
        ingest_http_port=free_port(),
        inference_grpc_port=free_port(),
    )


def format_report(r: DemoReport) -> str:
    lines = ["", "=" * 72, "Myelin demo report", "=" * 72]
    add = lines.append
    add(
        f"ingest     events sent {r.events_sent:,}: accepted {r.accepted:,}, rejected {r.rejected:,}, "
        f"duplicates (producer retry) {r.duplicates:,}"
    )
    add(
        f"           {r.accepted / max(r.ingest_s, 1e-9):,.0f} events/s through HTTP -> JetStream "
        f"({r.ingest_s:.1f} s)"
    )
    add(
        "           rejected by reason: "
        + ", ".join(f"{k}={v}" for k, v in sorted(r.rejected_by_reason.items()))
    )
    add(f"           dead letters in ClickHouse: {r.dlq_rows}")
    add(
        f"features   {r.feature_rows:,} feature vectors for {r.entities:,} users (view {VIEW}); "
        f"late events {r.late}; caught up {r.features_caught_up_s:.1f} s after ingest"
    )
    add(f"           raw events in ClickHouse: {r.events_in_clickhouse:,}")
    add(
        f"training   {r.training_rows:,} point-in-time rows from ClickHouse; model {MODEL} v{r.model_version}: "
        f"AUC {r.metrics.get('auc', 0):.3f}, logloss {r.metrics.get('logloss', 0):.3f}, "
        f"positive rate {r.metrics.get('positive_rate', 0):.3f}"
    )
    add(f"           ONNX vs scikit-learn max |diff| {r.onnx_vs_sklearn_max_diff:.2e}")
    add(f"governance champion promotion allowed; {r.denied_model} as challenger refused:")
    add(f"           {r.denied_promotion}")
    add(f"           Predict on {r.denied_model.split(' (')[0]} -> {r.denied_status}")
    add("           audit trail: " + ", ".join(f"{k}={v}" for k, v in sorted(r.audit_rows.items())))
    add(
        f"inference  {r.predictions:,} predictions served in {r.predict_requests:,} single-entity requests "
        f"+ 50 x 100-entity requests"
    )
    add(
        f"           Predict, 1 entity, 32 in flight: p50 {r.predict_p50_ms:.2f} ms, p99 {r.predict_p99_ms:.2f} ms, "
        f"{r.predict_rps:,.0f} req/s"
    )
    add(
        f"           Predict, 100 entities: p50 {r.batch100_p50_ms:.2f} ms, p99 {r.batch100_p99_ms:.2f} ms"
    )
    add(
        f"           OIP ModelInfer vs onnxruntime direct, 256 rows: max |diff| {r.oip_max_abs_diff:.2e}"
    )
    add(f"           inference records in ClickHouse: {r.inference_rows:,}")
    if r.trace_chain:
        add(
            f"tracing    trace {r.trace_chain.get('trace_id')} : event {r.trace_chain.get('event_id')} "
            f"({r.trace_chain.get('type')}) -> feature row seq {r.trace_chain.get('feature_seq')} -> "
            f"inference {r.trace_chain.get('inference_request')}"
        )
    add("")
    add('An analyst\'s query (myelin sql "..."):')
    add("  " + r.analyst_sql.replace("\n", "\n  "))
    if r.analyst_rows:
        cols = list(r.analyst_rows[0])
        add("  " + " | ".join(f"{c:>19}" for c in cols))
        for row in r.analyst_rows:
            add("  " + " | ".join(f"{v!s:>19}" for v in row.values()))
    add("=" * 72)
    return "\n".join(lines)
