"""`myelin models drift | agreement | quality` over real NATS and the warehouse's SQL
service on chdb: the breaches, the shadow's agreement and the quality per version, as an
operator reads them."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import pytest
from nats.aio.client import Client as NATS

from myelin import bus, models_cli
from myelin.cli import build_parser
from myelin.models import LabelSource, ModelRegistry, Provenance
from myelin.records import ColumnDrift, DriftDetected, InferenceRecord, Prediction
from myelin.settings import Settings
from myelin.warehouse import Warehouse
from services.warehouse.sink import WarehouseSink, drift_table, events_table, inferences_table
from services.warehouse.sql_api import serve_sql
from tests.helpers import stream_event, tiny_model

pytestmark = pytest.mark.integration


@pytest.fixture
async def sql_service(nc: NATS, warehouse: Warehouse) -> AsyncIterator[WarehouseSink]:
    sink = WarehouseSink(warehouse)  # the real SQL adapter, over the test's chdb
    sub = await serve_sql(nc, sink)
    try:
        yield sink
    finally:
        await sub.unsubscribe()
        sink._pool.shutdown(wait=True)  # (close() would close the session's warehouse)


async def _run(settings: Settings, *argv: str) -> int:
    return await models_cli.run(build_parser().parse_args(["models", *argv]), settings)


def _record(
    rid: str, ts: int, route: str, version: str, score: float, **kw: object
) -> InferenceRecord:
    return InferenceRecord(
        request_id=rid,
        ts_ms=ts,
        api="predict",
        model="ctr",
        model_version=version,
        alias="champion",
        latency_us=1,
        trace_id="",
        route=route,
        predictions=[Prediction(f"u-{rid}", score, {"clicks_1h": 1.0}, 5, "FRESH", "")],
        rows=1,
        **kw,  # type: ignore[arg-type]
    )


async def test_drift_agreement_and_quality_read_from_the_warehouse(
    nc: NATS,
    settings: Settings,
    warehouse: Warehouse,
    sql_service: WarehouseSink,
    capsys: pytest.CaptureFixture[str],
) -> None:
    now = int(time.time() * 1000)
    warehouse.insert_arrow(
        "myelin.drift_events",
        drift_table(
            [
                DriftDetected(
                    drift_id=f"ctr:v1:{now - 120_000}",
                    ts_ms=now - 60_000,
                    model="ctr",
                    model_version="1",
                    window_start_ms=now - 120_000,
                    window_end_ms=now - 60_000,
                    samples=640,
                    drifted=["clicks_1h"],
                    columns=[
                        ColumnDrift(
                            feature="clicks_1h",
                            samples=640,
                            psi=0.42,
                            js=0.2,
                            wasserstein=0.5,
                            ks=0.3,
                            breached=["psi", "js", "wasserstein", "ks"],
                        ),
                        ColumnDrift(
                            feature="ctr_1h",
                            samples=640,
                            psi=0.01,
                            js=0.01,
                            wasserstein=0.0,
                            ks=0.01,
                            breached=[],
                        ),
                    ],
                    thresholds={"min_samples": 500.0, "psi": 0.2},
                )
            ]
        ),
    )
    # three requests scored by v1 with v2 in shadow; clicks follow two of them
    records = [
        _record(
            f"r{k}", now - 300_000 + k, "champion", "1", s, shadow_version="2", shadow_scores=[t]
        )
        for k, (s, t) in enumerate(((0.9, 0.8), (0.2, 0.6), (0.7, 0.65)))
    ]
    warehouse.insert_arrow("myelin.inferences", inferences_table(records))
    clicks = [stream_event(f"c{k}", f"u-r{k}", now - 300_000 + k + 500) for k in (0, 2)]
    warehouse.insert_arrow(
        "myelin.events", events_table([(1000 * (i + 1), e) for i, e in enumerate(clicks)])
    )
    # the newest version names the label source the quality view joins through
    t = tiny_model(0)
    await ModelRegistry(nc, bus.jetstream(nc, settings)).register(
        "ctr",
        t.onnx,
        inputs=t.inputs,
        outputs=t.outputs,
        metrics=t.metrics,
        provenance=Provenance(
            training_window=list(t.window),
            feature_views=["user_activity@x"],
            feature_view="user_activity",
            features=t.features,
            label_source=LabelSource(kind="event", event_type="click", window_s=1),
        ),
    )

    assert await _run(settings, "drift", "ctr") == 0
    out = capsys.readouterr()
    assert "DriftDetected in the last 24 h: 1" in out.out
    [line] = [ln for ln in out.out.splitlines() if "clicks_1h" in ln]
    assert "n=640" in line and "psi=0.420" in line and "breached=psi,js,wasserstein,ks" in line
    assert "ctr_1h" not in out.out  # only the columns that breached
    assert "inference did not answer" in out.err  # no inference here: live figures unknown

    assert await _run(settings, "agreement", "ctr", "--threshold", "0.5") == 0
    [row] = [ln for ln in capsys.readouterr().out.splitlines() if ln.strip().startswith("v1")]
    fields = row.split()
    assert fields[:2] == ["v1", "v2"] and fields[4] == "3"  # 3 pairs
    assert float(fields[5]) == pytest.approx((0.1 + 0.4 + 0.05) / 3, abs=1e-4)
    assert fields[-1] == "1"  # one decision flipped at 0.5 (0.2 vs 0.6)

    assert await _run(settings, "quality", "ctr") == 0
    [q] = [ln for ln in capsys.readouterr().out.splitlines() if ln.strip().startswith("1 ")]
    cols = q.split()
    assert cols[0] == "1" and cols[4] == "3" and cols[5] == "2"  # n = 3, positives = 2
