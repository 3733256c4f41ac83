"""``myelin demo``: start the embedded stack, push a clickstream through ingest, wait for
features, train a model from the offline store, register and promote it through
governance, run the whole ML loop on live traffic and report what was measured.

The loop (every figure in the report is read back from the running platform):

1. **Before the shift.** The first half of the stream (normal traffic) is ingested in
   bulk, each user's events in their order; the champion is trained on a point-in-time
   training set bounded by the EVENTS sequence that half ends at (from an hour into it,
   when the 1h windows are full). The newest normal traffic is held back and *replayed*:
   each impression is scored with Predict just before it is sent, as an application
   scores an item before showing it, so the served features are those the training rows
   saw. The drift monitor judges those scores. (Scoring users after their sessions ended,
   as a load test does, is another question with other answers: the monitor would rightly
   call that drift, so the load test comes after the loop.)
2. **The shift.** The second half is a flash sale (:class:`~myelin.demo.generator.Surge`):
   its events are ingested in bulk, then it goes on *live*, in real time, with a Predict
   before every impression. The monitor flags the champion; the retrainer trains a
   challenger on a training set bounded at the drift, registers it with its lineage, and
   governance puts it in shadow.
3. **Shadow.** Live traffic goes on with the challenger scored beside the champion, then
   one outcome window longer, so that every score has its outcome (a click by the user
   within the window, or none): events that happened after the score, never before.
4. **Backtest and governance.** The challenger is backtested on the scores the champion
   served while it was in shadow, against their outcomes; the two versions' agreement is
   read from the ledger; governance is asked to move the challenger on to canary.
"""

from __future__ import annotations

import asyncio
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, TextIO

import aiohttp
import grpc
import msgspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from nats.aio.client import Client as NATS

from myelin import bus, grpc_client
from myelin.api_tokens import client_headers
from myelin.demo.common import (
    ANALYST_SQL,
    FEATURES,
    MODEL,
    VIEW,
    count,
    ingest,
    ingest_url,
    post,
    say,
    sql,
    tally,
    wait_features,
    wait_rows,
)
from myelin.demo.generator import FEED_CLICK_WINDOW_S, OUTCOME_WINDOW_S, demo_stream
from myelin.demo.loop import DEMO_DRIFT, DEMO_DRIFT_WINDOW_S, run_loop
from myelin.demo.progress import Progress
from myelin.demo.report import DemoReport, format_report
from myelin.demo.trainer import Trained, matrix, train
from myelin.drift import DriftPolicy
from myelin.gen import grpc_predict_v2_pb2 as oip
from myelin.gen import grpc_predict_v2_pb2_grpc as oip_grpc
from myelin.gen import myelin_predict_pb2 as mp
from myelin.gen import myelin_predict_pb2_grpc as mp_grpc
from myelin.models import LabelSource, ModelRegistry, PromotionDenied, Provenance
from myelin.retraining import holdout_metrics, score_onnx
from myelin.settings import Settings
from myelin.stack.process import free_port
from myelin.stack.supervisor import Stack, with_ports
from myelin.training import labels_spec, labels_sql, training_set_sql

__all__ = [
    "ANALYST_SQL",
    "FEATURES",
    "MODEL",
    "VIEW",
    "DemoReport",
    "demo_settings",
    "format_report",
    "register",
    "run_demo",
]


async def register(
    nc: Any,
    settings: Settings,
    t: Trained,
    view_hash: str,
    query: str,
    labels: dict[str, str] | None = None,
    *,
    outcome_window_s: int = 60,
    drift_policy: DriftPolicy | None = None,
) -> int:
    reg = ModelRegistry(nc, bus.jetstream(nc, settings))
    reference = t.reference
    if drift_policy is not None:
        reference = msgspec.structs.replace(reference, policy=drift_policy)
    mv = await reg.register(
        MODEL,
        t.onnx,
        inputs=t.inputs,
        outputs=t.outputs,
        metrics=t.metrics,
        labels=labels,
        reference=reference,
        provenance=Provenance(
            training_window=list(t.window),
            feature_views=[f"{VIEW}@{view_hash}"],
            feature_view=VIEW,
            features=t.features,
            training_rows=t.train_rows,
            training_query=query.strip(),
            created_by="myelin demo",
            # outcomes: a click by the user within the window after the score (myelin.quality)
            label_source=LabelSource(kind="event", event_type="click", window_s=outcome_window_s),
        ),
    )
    return mv.version


def _pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q)) if xs else 0.0


async def score(settings: Settings, users: list[str], report: DemoReport, out: TextIO) -> None:
    """Predict under load: single-entity calls 32 in flight, then 100-entity calls."""
    target = f"127.0.0.1:{settings.inference_grpc_port}"
    async with grpc_client.channel(settings, target) as ch:
        stub = mp_grpc.PredictorStub(ch)
        n = min(4000, max(len(users) * 2, 100))
        prog = Progress("predict (1 entity)", n, "requests", out)
        lat: list[float] = []
        sem = asyncio.Semaphore(32)
        served = 0

        async def one(i: int) -> None:
            nonlocal served
            async with sem:
                t0 = time.perf_counter()
                r = await stub.Predict(
                    mp.PredictRequest(model_name=MODEL, entity_ids=[users[i % len(users)]])
                )
                lat.append((time.perf_counter() - t0) * 1000)
                served += len(r.predictions)
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
            served += len(r.predictions)
        report.batch100_p50_ms, report.batch100_p99_ms = _pct(blat, 50), _pct(blat, 99)
        report.load_predictions = served
        report.predictions += served


async def oip_parity(
    settings: Settings, t: Trained, x: np.ndarray[Any, Any], version: int = 0
) -> float:
    """ModelInfer (raw tensors, as Triton clients send) vs onnxruntime in this process."""
    import onnxruntime as ort

    direct = ort.InferenceSession(t.onnx, providers=["CPUExecutionProvider"]).run(
        None, {"input": x}
    )[1]
    async with grpc_client.channel(settings) as ch:
        stub = oip_grpc.GRPCInferenceServiceStub(ch)
        req = oip.ModelInferRequest(
            model_name=MODEL, model_version=str(version) if version else "", id="parity"
        )
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


def since(query: str, t_ms: int) -> str:
    """A training set's rows from ``t_ms`` on (``ts``), in its order."""
    return f"""
SELECT * FROM ({query.strip()})
WHERE ts >= fromUnixTimestamp64Milli(toInt64({int(t_ms)}), 'UTC')
ORDER BY ts, entity_id, label"""


def loop_settings(settings: Settings) -> Settings:
    """The demo's settings: drift judged on windows of seconds, not a minute."""
    return replace(settings, drift_window_s=min(settings.drift_window_s, DEMO_DRIFT_WINDOW_S))


async def run_demo(settings: Settings, n_events: int, out: TextIO = sys.stderr) -> DemoReport:
    settings = loop_settings(settings)
    report = DemoReport()
    now = int(time.time() * 1000)
    say(out, f"Generating {n_events:,} clickstream events (the second half: a flash sale) ...")
    stream = demo_stream(n_events, now)
    report.events_sent = n_events + len(stream.bad)
    report.loop.normal_events = len(stream.history) + len(stream.replay)
    report.loop.hot_users = len(stream.surge.hot)
    async with Stack(settings, log=lambda m: say(out, "  " + m)):
        nc = await bus.connect(settings, "demo")
        try:
            say(out, "Ingesting the first half (normal traffic) ...")
            report.ingest_s = await ingest(settings, stream.history, report, out)
            async with aiohttp.ClientSession(headers=client_headers(settings)) as http:
                tally(
                    report, await post(http, ingest_url(settings), msgspec.json.encode(stream.bad))
                )
            t0 = time.perf_counter()
            health = await wait_features(nc, settings, out)
            report.features_caught_up_s = time.perf_counter() - t0
            view_hash = health["view_hash"]
            history_seq = health["position"]

            say(out, "Building a point-in-time training set from ClickHouse ...")
            spec = labels_spec("clicked_impressions", FEED_CLICK_WINDOW_S)
            query = since(
                training_set_sql(
                    VIEW,
                    FEATURES,
                    labels_sql(spec, max_seq=history_seq),
                    version=view_hash,
                    max_seq=history_seq,
                ),
                stream.warm_ms,
            )
            table: pa.Table = await sql(nc, query, arrow=True)
            report.training_rows = table.num_rows
            say(
                out,
                f"  {table.num_rows:,} labelled impressions up to EVENTS seq {history_seq} (from "
                "an hour into the stream, when the 1h windows are full); training logistic "
                "regression ...",
            )
            trained = await asyncio.to_thread(train, table, FEATURES)
            report.metrics = trained.metrics
            report.onnx_vs_sklearn_max_diff = trained.max_abs_diff_vs_sklearn
            # how its labels were built, so that a retrain (on drift) can rebuild them
            report.model_version = await register(
                nc,
                settings,
                trained,
                view_hash,
                query,
                {"training_labels": spec},
                outcome_window_s=OUTCOME_WINDOW_S,
                drift_policy=DEMO_DRIFT,
            )
            reg = ModelRegistry(nc, bus.jetstream(nc, settings))
            await reg.set_alias(MODEL, "champion", report.model_version, requester="demo")
            say(
                out,
                f"  registered {MODEL} v{report.model_version} (AUC {trained.metrics['auc']:.3f}) "
                "and promoted it to champion (governance allowed)",
            )
            await _refused(nc, settings, reg, table, view_hash, query, report, out)

            await run_loop(nc, settings, stream, report.model_version, report, out)

            say(out, "Measuring Predict under load ...")
            users = sorted({e["data"]["user_id"] for e in stream.history})
            await score(settings, users, report, out)
            x = _first_rows(table, 256)
            report.oip_max_abs_diff = await oip_parity(
                settings, trained, x, version=report.model_version
            )
            await _totals(nc, settings, report)
        finally:
            await nc.close()
    return report


async def _refused(
    nc: Any,
    settings: Settings,
    reg: ModelRegistry,
    table: pa.Table,
    view_hash: str,
    query: str,
    report: DemoReport,
    out: TextIO,
) -> None:
    """A model trained on inverted labels (a pipeline bug), validated on the true ones:
    governance must keep it out of service. (A model trained on shuffled labels is useless
    too, but its AUC is 0.5 give or take the holdout's noise, a few hundredths here: too
    close to the serving floor to be refused every time.)"""
    label = table.schema.get_field_index("label")
    flipped = table.set_column(
        label, "label", pc.subtract(pa.scalar(1, table.field(label).type), table.column(label))
    )
    broken = await asyncio.to_thread(train, flipped, FEATURES)
    x, y = matrix(table.slice(broken.train_rows), FEATURES)
    auc, logloss = holdout_metrics(y, score_onnx(broken.onnx, x))
    noise = replace(broken, metrics={**broken.metrics, "auc": auc, "logloss": logloss})
    noise_v = await register(
        nc, settings, noise, view_hash, query, {"defect": "trained on inverted labels"}
    )
    try:
        await reg.set_alias(MODEL, "champion", noise_v, requester="demo")
    except PromotionDenied as exc:
        say(out, f"  promotion of v{noise_v} to champion denied: {exc.message}")
    # The promote policy includes every serving rule: even the challenger alias is
    # refused to a model that may not be served, before it takes effect.
    try:
        await reg.set_alias(MODEL, "challenger", noise_v, requester="demo")
        report.denied_promotion = "ALLOWED (unexpected)"
    except PromotionDenied as exc:
        report.denied_promotion = exc.message
    report.denied_model = f"{MODEL} v{noise_v} (AUC {noise.metrics['auc']:.3f})"
    async with grpc_client.channel(settings) as ch:
        try:  # asked for by version: serving it is refused too
            await mp_grpc.PredictorStub(ch).Predict(
                mp.PredictRequest(
                    model_name=MODEL, model_version=str(noise_v), entity_ids=["user-00001"]
                )
            )
            report.denied_status = "SERVED (unexpected)"
        except grpc.aio.AioRpcError as err:
            report.denied_status = f"{err.code().name}: {err.details()}"


async def _totals(nc: NATS, settings: Settings, report: DemoReport) -> None:
    """What the platform holds at the end, read back from it."""
    health = await wait_features(nc, settings, None)
    report.feature_rows, report.late = health["feature_rows"], health["late"]
    report.entities = await count(
        nc, f"SELECT uniqExact(entity_id) AS n FROM myelin.feature_values WHERE view = '{VIEW}'"
    )
    report.inference_rows = await wait_rows(
        nc,
        "SELECT count() AS n FROM myelin.inferences FINAL WHERE api = 'predict' "
        "AND route != 'shadow'",
        report.predictions,
    )
    report.shadow_rows = await count(
        nc, "SELECT count() AS n FROM myelin.inferences FINAL WHERE route = 'shadow'"
    )
    await wait_rows(nc, "SELECT count() AS n FROM myelin.dead_letters FINAL", 1)
    report.dlq_rows = await count(nc, "SELECT count() AS n FROM myelin.dead_letters FINAL")
    for row in await sql(
        nc,
        "SELECT concat(action, if(allow, ':allow', ':deny')) AS k, count() AS n "
        "FROM myelin.audit FINAL GROUP BY k ORDER BY k",
    ):
        report.audit_rows[row["k"]] = int(row["n"])
    report.events_in_clickhouse = await count(nc, "SELECT count() AS n FROM myelin.events FINAL")
    for row in await sql(
        nc,
        f"SELECT model_version AS v, uniqExact(drift_id) AS n FROM myelin.drift_events FINAL "
        f"WHERE model = '{MODEL}' GROUP BY v ORDER BY v",
    ):
        report.loop.drift_records[str(row["v"])] = int(row["n"])
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


def _first_rows(table: pa.Table, n: int) -> np.ndarray[Any, Any]:
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
        warehouse_http_port=free_port(),
        ops_http_port=free_port(),
    )
