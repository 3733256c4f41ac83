"""The retrainer service in the running platform: a DriftDetected record of the champion
on the DRIFT stream starts one retrain job (however many windows report the drift), which
waits for the features service and the warehouse to reach its bound, builds the training
set over NATS, trains, registers a challenger with its lineage and puts it in shadow
through governance. Records that are not drift records are dead-lettered."""

from __future__ import annotations

import asyncio
import io
import time
from typing import Any

import aiohttp
import msgspec
import pytest
from nats.aio.client import Client as NATS

from myelin import bus, sql_client
from myelin.api_tokens import client_headers
from myelin.demo.generator import CLICK_WINDOW_S, generate
from myelin.demo.runner import FEATURES, MODEL, VIEW, register
from myelin.models import ModelRegistry
from myelin.records import DriftDetected
from myelin.retraining import RetrainJob, fingerprint, retrain_command
from myelin.settings import Settings
from myelin.stack.supervisor import Stack
from myelin.subjects import EVENTS_STREAM, RETRAINS_BUCKET, drift_subject, health_subject
from myelin.trainers import train
from myelin.training import labels_spec, labels_sql, training_set_sql
from tests.helpers import wait_caught_up

pytestmark = pytest.mark.e2e
SPEC = labels_spec("clicked_impressions", CLICK_WINDOW_S)


async def post(settings: Settings, events: list[dict[str, Any]]) -> None:
    url = f"http://127.0.0.1:{settings.ingest_http_port}/v1/events"
    async with aiohttp.ClientSession(headers=client_headers(settings)) as http:
        for i in range(0, len(events), 2000):
            async with http.post(url, json=events[i : i + 2000]) as r:
                assert r.status == 200, await r.text()


def drift(window_start_ms: int) -> DriftDetected:
    return DriftDetected(
        drift_id=f"{MODEL}:v1:{window_start_ms}",
        ts_ms=window_start_ms + 60_000,
        model=MODEL,
        model_version="1",
        window_start_ms=window_start_ms,
        window_end_ms=window_start_ms + 60_000,
        samples=800,
        drifted=["ctr_1h"],
        columns=[],
        thresholds={"psi": 0.2},
    )


async def health(nc: NATS, name: str) -> dict[str, Any]:
    result: dict[str, Any] = msgspec.json.decode(await bus.request(nc, health_subject(name), {}))
    return result


class Tee(io.StringIO):
    """Progress lines, kept."""

    def __init__(self, lines: list[str]) -> None:
        super().__init__()
        self.lines = lines

    def write(self, text: str) -> int:
        self.lines.extend(t for t in text.splitlines() if t)
        return len(text)


async def test_a_drift_of_the_champion_trains_one_challenger_into_shadow(
    settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    stream = generate(16_000, int(time.time() * 1000), users=300, items=60)
    half = len(stream.events) // 2
    services = ("governance", "warehouse", "features", "ingest", "retrainer")
    async with Stack(settings, log=lambda _m: None, services=services):
        nc = await bus.connect(settings, "test", identity="admin")
        try:
            js = bus.jetstream(nc, settings)
            reg = ModelRegistry(nc, js)
            await post(settings, stream.events[:half])
            first = await wait_caught_up(nc, settings)
            view_hash = (await health(nc, "features"))["view_hash"]
            query = training_set_sql(
                VIEW, FEATURES, labels_sql(SPEC, max_seq=first), version=view_hash, max_seq=first
            )
            trained = train(await sql_client.query(nc, query), FEATURES)
            v1 = await register(nc, settings, trained, view_hash, query, {"training_labels": SPEC})
            await reg.set_alias(MODEL, "champion", v1, requester="test")

            await post(settings, stream.events[half:])
            bound = int((await js.stream_info(EVENTS_STREAM)).state.last_seq)
            await js.publish(drift_subject(MODEL), b"\x93not a drift record", headers={})

            async def window(start: int, position: int) -> dict[str, Any]:
                """Publish the drift of a window; wait until the retrainer has handled it."""
                record = drift(start)
                await js.publish(
                    drift_subject(MODEL),
                    msgspec.msgpack.encode(record),
                    headers={"Nats-Msg-Id": f"drift-{record.drift_id}"},
                )
                deadline = time.monotonic() + 90
                while True:
                    h = await health(nc, "retrainer")
                    if h["drift"]["position"] >= position and not h["job"]:
                        return h
                    assert time.monotonic() < deadline, h
                    await asyncio.sleep(0.2)

            h = await window(0, 2)
            assert h["jobs"] == {"done": 1} and h["drift"]["dead_lettered"] == 1
            h = await window(60_000, 3)  # a later window of the same drift: the same job
            assert h["jobs"] == {"done": 1, "existing": 1}
            kv = await js.key_value(RETRAINS_BUCKET)
            job = msgspec.json.decode(
                (await kv.get(f"{MODEL}.drift.v1")).value or b"", type=RetrainJob
            )
            assert (job.state, job.version, job.bound, job.attempt) == ("done", 2, bound, 1), job
            assert await reg.versions(MODEL) == [1, 2]
            assert (await reg.routes(MODEL)).shadow == 2
            mv = await reg.get(MODEL, 2)
            assert mv.labels["origin"] == "retrain" and mv.labels["stream_seq_bound"] == str(bound)
            assert mv.provenance.feature_views == [f"{VIEW}@{view_hash}"]
            assert mv.metrics["champion_auc"] > 0.5 and mv.metrics["auc"] >= 0.55

            # the job's training set, built again through the warehouse service: the same rows
            again = await sql_client.query(nc, mv.provenance.training_query)
            assert (
                fingerprint(again, FEATURES) == job.fingerprint == mv.labels["training_fingerprint"]
            )
            assert again.num_rows == job.rows > trained.train_rows
            # `myelin models retrain ctr --bound N` runs the same kind of job in the CLI: the
            # same bound, the same training set
            lines: list[str] = []
            code = await retrain_command(settings, MODEL, bound=bound, force=False, out=Tee(lines))
            printed = msgspec.json.decode(capsys.readouterr().out, type=RetrainJob)
            assert code == 0 and printed.job_id == f"{MODEL}.seq.{bound}", lines
            assert printed.fingerprint == job.fingerprint and printed.version == 3
            assert any("training set:" in ln for ln in lines)

            want = [("retrain_finish", 1, 2), ("retrain_skip", 0, 1), ("retrain_start", 1, 2)]
            deadline = time.monotonic() + 30
            while True:  # the warehouse drains AUDIT about once a second
                audit = await sql_client.query_rows(
                    nc,
                    "SELECT action, allow, count() AS n FROM myelin.audit FINAL "
                    "WHERE action LIKE 'retrain_%' GROUP BY action, allow ORDER BY action",
                )
                got = [(r["action"], r["allow"], r["n"]) for r in audit]
                if got == want or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.3)
            assert got == want
        finally:
            await nc.close()
