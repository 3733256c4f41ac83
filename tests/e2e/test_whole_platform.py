"""The whole platform as separate processes on real engines, as a user runs it."""

from __future__ import annotations

import asyncio
import io
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnxruntime as ort
import psutil
import pytest

from myelin import bus
from myelin.api_tokens import client_headers, client_token
from myelin.demo.runner import DemoReport, format_report, run_demo
from myelin.drift import METRICS
from myelin.grpc_client import ca_file
from myelin.settings import Settings
from myelin.stack.supervisor import Stack
from tests.helpers import (
    FEATURES,
    clickstream,
    offline_counts,
    register,
    tiny_model,
    wait_caught_up,
)

pytestmark = pytest.mark.e2e


def _children() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True)}


DEMO_EVENTS = 12_000  # the champion trains on the first half: ~2,900 rows


async def test_demo_end_to_end(settings: Settings) -> None:
    out = io.StringIO()
    before = _children()
    report: DemoReport = await run_demo(settings, DEMO_EVENTS, out)
    assert _children() == before, "the demo left processes behind"
    assert report.accepted == DEMO_EVENTS
    assert report.duplicates >= 2000  # the re-sent first batch
    assert report.rejected == 8 and report.dlq_rows == 8
    assert set(report.rejected_by_reason) == {
        "invalid_payload",
        "unknown_type",
        "unknown_version",
        "clock_skew",
        "invalid_envelope",
    }
    # the stream, then the sale's live traffic
    assert report.live_accepted > 0 and report.loop.live_rejected == 0
    assert report.events_in_clickhouse == DEMO_EVENTS + report.live_accepted
    # every event is a feature row or counted late
    assert report.feature_rows + report.late == DEMO_EVENTS + report.live_accepted
    assert report.training_rows > 1000
    assert report.metrics["auc"] >= 0.6  # governance's floor for a champion
    assert report.onnx_vs_sklearn_max_diff < 1e-5
    assert report.oip_max_abs_diff == 0.0
    assert "FAILED_PRECONDITION" in report.denied_status and "serving floor" in report.denied_status
    assert "to challenger was denied" in report.denied_promotion
    assert "serving floor" in report.denied_promotion  # the serve rules, in the promote policy
    assert report.predictions > 0 and report.inference_rows == report.predictions
    assert (
        report.audit_rows.get("promote:allow", 0) >= 1
        and report.audit_rows.get("promote:deny", 0) >= 2
        and report.audit_rows.get("serve:deny", 0) >= 1
        and report.audit_rows.get("retrain_start:allow", 0) == 1
        and report.audit_rows.get("retrain_finish:allow", 0) == 1
    )
    assert report.trace_chain and len(report.trace_chain["trace_id"]) == 32
    assert report.analyst_rows and sum(int(r["impressions"]) for r in report.analyst_rows) > 0
    assert "features catch up" in out.getvalue()  # progress was shown
    _assert_the_loop(report)
    _assert_no_raw_pii(settings, out.getvalue())


def _assert_the_loop(report: DemoReport) -> None:
    """Drift, retrain, shadow, backtest and governance, as measured and as printed."""
    lp, champion = report.loop, report.model_version
    text = format_report(report)
    # normal traffic scored as it is shown: judged, no drift
    assert lp.replay_rows >= 500 and lp.before_rows_judged >= 500
    assert lp.before_breaches == 0 and "no drift" in text
    assert set(lp.before_largest) == set(METRICS)
    # the sale: drift of the champion, naming the columns and the metrics that breached
    assert lp.drift_version == champion and lp.drift_samples >= lp.thresholds["min_samples"]
    assert lp.drift_id.startswith(f"ctr:v{champion}:")
    breached = {c["feature"]: c["breached"] for c in lp.drift_columns}
    assert {"impressions_10m", "impressions_1h", "clicks_10m"} <= set(breached)
    for c in lp.drift_columns:
        assert c["breached"] and set(c["breached"]) <= set(METRICS)
        assert all(c[m] >= lp.thresholds[m] for m in c["breached"])
    assert f"ctr v{champion} flagged" in text and "impressions_1h" in text and "PSI" in text
    # the retrain: one job, from that drift, a challenger with its lineage
    job = lp.job
    assert job["job_id"] == f"ctr.drift.v{champion}" and job["state"] == "done"
    assert job["trigger"] == "drift" and job["trigger_ref"] == lp.drift_id
    assert lp.challenger == job["version"] > champion
    labels = lp.challenger_labels
    assert labels["origin"] == "retrain" and labels["retrain_job"] == job["job_id"]
    assert labels["parent_version"] == str(champion)
    assert labels["stream_seq_bound"] == str(job["bound"])
    assert labels["training_fingerprint"] == job["fingerprint"] and len(job["fingerprint"]) == 64
    assert labels["training_labels"] == "clicked_impressions:5"
    assert 0 < lp.sale_rows_in_training < job["rows"]  # trained on both halves
    assert lp.challenger_thresholds == lp.thresholds  # the champion's drift policy
    m = lp.challenger_metrics
    assert m["auc"] >= 0.55 and 0.0 < m["champion_auc"] < 1.0 and m["holdout_rows"] > 0
    assert f"challenger ctr v{lp.challenger}" in text and job["fingerprint"][:16] in text
    # in shadow: its scores in the ledger beside the champion's
    assert lp.in_shadow and lp.shadow_rows > 0 and report.shadow_rows >= lp.shadow_rows
    assert lp.agreement["n"] > 0 and 0.0 <= lp.agreement["mean_abs_diff"] <= 1.0
    assert f"governance put v{lp.challenger} in shadow" in text
    # the backtest: the candidate and the served version on the same judged rows
    bt = lp.backtest
    assert not lp.backtest_error and bt["rows"] > 0 and bt["rows"] == bt["served_rows"]
    assert (str(champion), "champion", bt["rows"]) in bt["groups"]
    assert bt["served"]["n"] == bt["candidate"]["n"] == bt["rows"]
    assert 0 < bt["served"]["positives"] < bt["rows"]  # both outcomes happened
    assert f"v{champion}  " in lp.backtest_text and f"candidate v{lp.challenger}" in text
    # governance's decision on the next stage, with its reasons when it refuses
    d = lp.decision
    assert d["to"] == "canary" and d["version"] == lp.challenger and d["decision_id"]
    assert d["stage"] == ("canary" if d["allow"] else "shadow")
    assert d["allow"] or d["reasons"]
    assert f"ctr v{lp.challenger} shadow -> canary" in text
    assert ("ALLOWED" if d["allow"] else "DENIED") in text


CHDB_SCAN = """
import sys, chdb.session as cs
s = cs.Session(sys.argv[1])
q = lambda sql: int(s.query(sql, "CSV").bytes().strip() or 0)
leaks = q("SELECT (SELECT count() FROM myelin.events WHERE position(data, '@mail.example') > 0)"
          " + (SELECT count() FROM myelin.dead_letters WHERE position(payload, '@mail.example') > 0)"
          " + (SELECT count() FROM myelin.audit WHERE position(input, '@mail.example') > 0)"
          " + (SELECT count() FROM myelin.inferences WHERE position(entity_id, '@mail.example') > 0)")
tokens = q("SELECT count() FROM myelin.events WHERE type = 'purchase' AND schema_version = 2"
           " AND startsWith(JSONExtractString(data, 'email'), 'pii:')")
dlq = q("SELECT count() FROM myelin.dead_letters WHERE event_id = 'bad-amount' AND position(payload, 'pii:') > 0")
print(leaks, tokens, dlq)
"""


def _assert_no_raw_pii(settings: Settings, output: str) -> None:
    """No e-mail from the demo in any stream file, the Redis AOF, a log or ClickHouse."""
    import subprocess
    import sys

    from myelin.demo.generator import email_of

    assert "@mail.example" in email_of(1)  # what the producer sent, and what must not leak
    needle, control = b"@mail.example", b"demo-web"
    files = [p for p in settings.state_dir.rglob("*") if p.is_file() and "chdb" not in p.parts]
    stream_files = [p for p in files if "jetstream" in p.parts]
    assert stream_files and any(
        control in p.read_bytes() for p in stream_files
    )  # the grep can find things
    leaked = [str(p) for p in files if needle in p.read_bytes()]
    assert not leaked, f"raw PII found in {leaked}"
    assert "@mail.example" not in output
    scan = subprocess.run(
        [sys.executable, "-c", CHDB_SCAN, str(settings.warehouse_dir)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    leaks, tokens, dlq = (int(x) for x in scan.stdout.split())
    assert leaks == 0
    assert tokens > 0  # the e-mails are there, as tokens
    assert dlq == 1  # the rejected purchase was dead-lettered with its e-mail tokenized


async def test_stock_triton_client(settings: Settings, tmp_path: Path) -> None:
    """tritonclient.grpc, unchanged, in its own process, against the inference service."""
    import json
    import subprocess
    import sys

    async with Stack(settings, log=lambda _m: None):
        nc = await bus.connect(settings, "test")
        try:
            trained = tiny_model()
            version = await register(nc, settings, trained)
        finally:
            await nc.close()
        x = np.random.default_rng(5).poisson(3, (16, len(FEATURES))).astype(np.float32)
        np.save(tmp_path / "x.npy", x)
        direct = ort.InferenceSession(trained.onnx).run(None, {"input": x})[1]
        probe = Path(__file__).with_name("triton_probe.py")
        proc = await asyncio.to_thread(
            subprocess.run,
            [
                sys.executable,
                str(probe),
                f"127.0.0.1:{settings.inference_grpc_port}",
                "ctr",
                str(tmp_path / "x.npy"),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            env={
                **os.environ,
                "TRITON_CA": str(ca_file(settings)),
                "TRITON_TOKEN": client_token(settings, "app") or "",
            },
        )
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    assert got["live"] is True and got["ready"] is True and got["model_ready"] is True
    meta = got["meta"]
    assert meta["platform"] == "onnx_onnxv1" and meta["versions"] == [str(version)]
    assert meta["inputs"][0] == {
        "name": "input",
        "datatype": "FP32",
        "shape": ["-1", str(len(FEATURES))],
    }
    assert got["server"]["name"] == "myelin"
    assert got["id"] == "triton-1"
    assert got["missing"] == "StatusCode.NOT_FOUND"
    assert np.array_equal(np.array(got["probs"], dtype=np.float32), direct)


async def test_ingest_to_online_across_repeated_features_crashes(settings: Settings) -> None:
    """kill -9 the features process at random points while events stream in, three times;
    nothing is lost or double-counted: row counts are exact and every entity's online
    vector equals an offline recomputation from the complete raw history."""
    import random
    import time

    import aiohttp
    import msgspec

    from myelin.subjects import (
        RPC_FEATURES_CHECK,
    )

    rng = random.Random()
    s = replace(settings, features_batch=20)
    n = 12_000
    async with Stack(s, log=lambda _m: None) as stack:
        url = f"http://127.0.0.1:{s.ingest_http_port}/v1/events"
        events = clickstream(
            n,
            prefix="k",
            now_ms=int(time.time() * 1000),
            users=37,
            items=11,
            ago_ms=1_800_000,
            step_ms=100,
            types=("click", "impression", "impression", "purchase"),
            amount=lambda i: float(i % 50),
        )

        async def send() -> None:
            async with aiohttp.ClientSession(headers=client_headers(s)) as http:
                for k, i in enumerate(range(0, n, 500)):
                    mode = "?mode=per_event" if k % 3 == 2 else ""  # both storage formats
                    async with http.post(url + mode, json=events[i : i + 500]) as r:
                        assert r.status == 200
                    await asyncio.sleep(rng.uniform(0, 0.1))

        sender = asyncio.create_task(send())
        for _ in range(3):
            await asyncio.sleep(rng.uniform(0.3, 1.2))
            stack.procs["features"].kill()  # no goodbye, wherever it was in its batch
            await stack.restart_service("features")
        await sender
        nc = await bus.connect(s, "test")
        try:
            await wait_caught_up(nc, s)
            assert await offline_counts(nc) == {"events": n, "fv": n}
            res = msgspec.json.decode(
                await bus.request(nc, RPC_FEATURES_CHECK, {"sample": 100}, timeout=60)
            )
            assert res["checked"] == 37 and res["mismatches"] == []
        finally:
            await nc.close()


async def test_redis_restart_and_warehouse_kill_lose_and_double_count_nothing(
    settings: Settings,
) -> None:
    """While events stream in: Redis is restarted (the features service retries its batch
    against the reloaded state) and the warehouse is killed with SIGKILL and restarted
    (its drains resume from their last acked batch). The end state is exact: one raw row
    and one feature row per event, and online vectors equal their offline recomputation."""
    import random
    import time

    import aiohttp
    import msgspec

    from myelin.sql_client import wait_stored
    from myelin.subjects import (
        FEATURES_STREAM,
        RPC_FEATURES_CHECK,
    )

    rng = random.Random()
    s = replace(settings, features_batch=20)
    n = 8_000
    async with Stack(s, log=lambda _m: None) as stack:
        url = f"http://127.0.0.1:{s.ingest_http_port}/v1/events"
        events = clickstream(
            n,
            prefix="r",
            now_ms=int(time.time() * 1000),
            users=29,
            items=7,
            ago_ms=1_800_000,
            step_ms=100,
            types=("click", "impression", "impression", "purchase"),
            amount=lambda i: float(i % 40),
        )

        async def send() -> None:
            async with aiohttp.ClientSession(headers=client_headers(s)) as http:
                for i in range(0, n, 400):
                    async with http.post(url, json=events[i : i + 400]) as r:
                        assert r.status == 200
                    await asyncio.sleep(rng.uniform(0, 0.08))

        sender = asyncio.create_task(send())
        await asyncio.sleep(rng.uniform(0.3, 0.8))
        assert stack.redis is not None
        await stack.redis.stop()  # Redis goes away mid-stream ...
        await asyncio.sleep(0.5)
        stack.redis.start()  # ... and comes back with its append-only file
        await stack.redis.wait_ready()
        await asyncio.sleep(rng.uniform(0.2, 0.6))
        stack.procs["warehouse"].kill()  # SIGKILL, wherever its inserts were
        await stack.restart_service("warehouse")
        await sender
        nc = await bus.connect(s, "test")
        try:
            js = bus.jetstream(nc, s)
            last = await wait_caught_up(nc, s)
            features_last = (await js.stream_info(FEATURES_STREAM)).state.last_seq
            assert await offline_counts(nc) == {"events": n, "fv": n}
            res = msgspec.json.decode(
                await bus.request(nc, RPC_FEATURES_CHECK, {"sample": 100}, timeout=60)
            )
            assert res["checked"] == 29 and res["mismatches"] == []
            # killed again once everything is stored: it knows where it stands at once
            stack.procs["warehouse"].kill()
            await stack.restart_service("warehouse")
            await wait_stored(nc, events_seq=last, features_seq=features_last, timeout=5)
            assert await offline_counts(nc) == {"events": n, "fv": n}
        finally:
            await nc.close()
