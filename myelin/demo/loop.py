"""The demo's ML loop on live traffic: normal traffic scored as it is shown (no drift), a
flash sale (drift), the retrainer's challenger in shadow, its backtest, governance's
decision on its next stage (see :mod:`myelin.demo.runner`)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable
from typing import Any, TextIO, TypeVar

import aiohttp
import grpc
import msgspec
import pyarrow as pa

from myelin import bus, grpc_client, sql_client
from myelin.api_tokens import client_headers
from myelin.backtest import BacktestError, BacktestReport, NoLabelSource, run_backtest
from myelin.backtest import format_report as format_backtest
from myelin.demo.common import (
    MODEL,
    applied,
    count,
    health,
    ingest,
    ingest_url,
    post,
    say,
    sql,
    stable_count,
    tally,
    wait_features,
    wait_rows,
)
from myelin.demo.generator import OUTCOME_WINDOW_S, DemoStream, replay_rounds
from myelin.demo.progress import Progress
from myelin.demo.report import DemoReport, Phase
from myelin.drift import METRICS, DriftPolicy
from myelin.gen import myelin_predict_pb2 as mp
from myelin.gen import myelin_predict_pb2_grpc as mp_grpc
from myelin.models import ModelRegistry, PromotionDenied
from myelin.quality import agreement_sql
from myelin.retraining import RetrainJob, advance, list_jobs
from myelin.settings import Settings
from myelin.tasks import cancel_and_wait

T = TypeVar("T")

# When the demo's model counts a window as drifted: the default thresholds (PSI 0.2, JS 0.1,
# W1 0.1, KS 0.1), with W1, JS and KS widened for windows of a few hundred sessions' rows
# (correlated within a session). On the replayed normal traffic the largest figures
# measured were W1 0.13 (impressions_1h, 2,853 rows) and JS 0.06: W1 0.1 flags sampling
# noise. The sale moves the impression and click counts by PSI 0.6-8, JS 0.3-0.9, W1
# 0.8-2.3, KS 0.3-0.9.
DEMO_DRIFT = DriftPolicy(min_samples=500, psi=0.2, js=0.15, wasserstein=0.3, ks=0.15)
# The monitor judges windows this long (MYELIN_DRIFT_WINDOW_S; 60 s by default): the demo
# has seconds of traffic per phase, not minutes.
DEMO_DRIFT_WINDOW_S = 3.0
LIVE_TICK_S = 0.1  # the live traffic is sent, and its impressions scored, every tick
SHADOW_S = 6.0  # live traffic with the challenger in shadow
DRIFT_TIMEOUT_S = 90.0
RETRAIN_TIMEOUT_S = 300.0


async def _predict(stub: Any, users: list[str]) -> int:
    r = await stub.Predict(mp.PredictRequest(model_name=MODEL, entity_ids=users))
    return len(r.predictions)


async def replay(
    nc: Any,
    settings: Settings,
    events: list[dict[str, Any]],
    report: DemoReport,
    out: TextIO,
) -> None:
    """The newest normal traffic, each impression scored (Predict) just before it is sent:
    round by round, each user's next impression (:func:`replay_rounds`), after the
    features service has applied everything of that user before it."""
    rounds = replay_rounds(events)
    loop = report.loop
    loop.replay_rounds = sum(1 for users, _ in rounds if users)
    prog = Progress("replay (score, then send)", len(events), "events", out)
    async with (
        grpc_client.channel(settings) as ch,
        aiohttp.ClientSession(headers=client_headers(settings)) as http,
    ):
        stub = mp_grpc.PredictorStub(ch)
        for users, batch in rounds:
            if users:
                n = await _predict(stub, users)
                loop.replay_rows += n
                report.predictions += n
            for i in range(0, len(batch), 2000):
                tally(
                    report,
                    await post(
                        http, ingest_url(settings), msgspec.json.encode(batch[i : i + 2000])
                    ),
                )
            await applied(nc, settings)
            prog.update(len(batch))
    loop.replay_s = prog.close()


class LiveTraffic:
    """The sale in real time: every tick, the impressions due are scored in one Predict
    (users' features as the events sent so far made them), then every event due is sent.
    Phases are named by the caller (``phase``); each counts its own traffic."""

    def __init__(self, settings: Settings, stream: DemoStream, report: DemoReport) -> None:
        self._s = settings
        self._surge = stream.surge
        self._report = report
        self.phase = "sale"
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._t0 = 0.0

    def _current(self) -> Phase:
        return self._report.loop.live.setdefault(self.phase, Phase())

    def set_phase(self, name: str) -> None:
        now = time.perf_counter()
        self._current().seconds += now - self._t0
        self._t0 = now
        self.phase = name

    async def __aenter__(self) -> LiveTraffic:
        self._surge.resume_at(int(time.time() * 1000))
        self._t0 = time.perf_counter()
        self._task = asyncio.create_task(self._run(), name="live-traffic")
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        if self._task is not None:
            if exc[0] is None:
                await self._task  # its failure is the demo's
            else:
                await asyncio.gather(self._task, return_exceptions=True)
        self.set_phase(self.phase)

    async def guard(self, step: Awaitable[T]) -> T:
        """``step`` while the traffic flows: if the traffic stops with an error first, that
        error (a wait for drift would otherwise wait for traffic that never comes)."""
        if self._task is None:
            raise RuntimeError("LiveTraffic.guard() is for inside `async with`")
        task = asyncio.ensure_future(step)
        await asyncio.wait({task, self._task}, return_when=asyncio.FIRST_COMPLETED)
        if not task.done():
            await cancel_and_wait(task)
            await self._task  # raises its error
            raise RuntimeError("the live traffic stopped on its own")
        return task.result()

    async def _run(self) -> None:
        async with (
            grpc_client.channel(self._s) as ch,
            aiohttp.ClientSession(headers=client_headers(self._s)) as http,
        ):
            stub = mp_grpc.PredictorStub(ch)
            enc = msgspec.json.Encoder()
            next_tick = time.monotonic()
            while not self._stop.is_set():
                events = self._surge.until(int(time.time() * 1000))
                phase = self._current()
                users = [e["data"]["user_id"] for e in events if e["type"] == "impression"]
                if users:
                    phase.requests += 1
                    try:
                        n = await _predict(stub, users)
                    except grpc.aio.AioRpcError:
                        phase.failed += 1
                    else:
                        phase.predictions += n
                        self._report.predictions += n
                if events:
                    res = await post(http, ingest_url(self._s), enc.encode(events))
                    self._report.live_accepted += res["accepted"]
                    self._report.loop.live_rejected += res["rejected"]
                    phase.events += len(events)
                next_tick += LIVE_TICK_S
                delay = next_tick - time.monotonic()
                if delay < 0:  # behind: catch up from now, the next tick sends more
                    next_tick = time.monotonic()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), max(delay, 0.0))


async def _window_edge(nc: Any, timeout_s: float = 30.0) -> int:
    """Until the drift monitor starts a new window; its number."""
    start = int((await health(nc, "inference"))["drift_windows"])
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        now = int((await health(nc, "inference"))["drift_windows"])
        if now != start:
            return now
        await asyncio.sleep(0.01)
    return start


def _label(version: int) -> str:
    return f"{MODEL}:v{version}"


async def judge_before(nc: Any, champion: int, policy: DriftPolicy, report: DemoReport) -> None:
    """Wait until the monitor has judged the replayed traffic; keep its figures."""
    label = _label(champion)
    deadline = time.monotonic() + 60.0
    while True:
        h = await health(nc, "inference")
        pending = int(h["drift_pending_rows"].get(label, 0))
        scores = {k: v for k, v in h["drift_score"].items() if k.startswith(label + ":")}
        if scores and pending < policy.min_samples:
            break
        if time.monotonic() > deadline:
            report.loop.stopped = (
                f"the drift monitor judged no window of {label} in 60 s ({pending} rows "
                "pending): is the inference service's drift watch running?"
            )
            return
        await asyncio.sleep(0.2)
    loop = report.loop
    loop.before_rows_judged = loop.replay_rows - pending
    loop.before_breaches = int(h["drift_detected"].get(label, 0))
    for metric in METRICS:
        figures = {k.split(":")[2]: float(v) for k, v in scores.items() if k.endswith(f":{metric}")}
        column = max(figures, key=lambda c: figures[c])
        loop.before_largest[metric] = (column, figures[column])


async def wait_drift(nc: Any, champion: int, report: DemoReport, out: TextIO) -> bool:
    """Until the monitor flags the champion and the record is in ClickHouse (False: not
    within ``DRIFT_TIMEOUT_S``, said why)."""
    label = _label(champion)
    t0 = time.perf_counter()
    deadline = time.monotonic() + DRIFT_TIMEOUT_S
    while int((await health(nc, "inference"))["drift_detected"].get(label, 0)) < 1:
        if time.monotonic() > deadline:
            report.loop.stopped = (
                f"the drift monitor flagged no window of {label} in {DRIFT_TIMEOUT_S:.0f} s of "
                "live sale (myelin models drift ctr shows the figures it measured)"
            )
            say(out, "  " + report.loop.stopped)
            return False
        await asyncio.sleep(0.1)
    report.loop.drift_after_s = time.perf_counter() - t0
    say(out, f"  drift detected on {label} after {report.loop.drift_after_s:.1f} s of live sale")
    query = f"""
        SELECT drift_id, model_version, toUnixTimestamp64Milli(window_start) AS start_ms,
               toUnixTimestamp64Milli(window_end) AS end_ms, samples, feature,
               psi, js, wasserstein, ks, breached
        FROM myelin.drift_events FINAL WHERE model = '{MODEL}'
        ORDER BY window_start, feature"""
    while True:
        rows = [
            r for r in await sql(nc, query) if str(r["model_version"]).lstrip("v") == str(champion)
        ]
        if rows:
            break
        if time.monotonic() > deadline:
            report.loop.stopped = "the drift record did not reach myelin.drift_events"
            return False
        await asyncio.sleep(0.2)
    first = rows[0]["drift_id"]
    mine = [r for r in rows if r["drift_id"] == first]
    loop = report.loop
    loop.drift_id = first
    loop.drift_version = champion
    loop.drift_window_ms = (int(mine[0]["start_ms"]), int(mine[0]["end_ms"]))
    loop.drift_samples = int(mine[0]["samples"])
    loop.drift_columns = [
        {
            "feature": r["feature"],
            "breached": list(r["breached"]),
            **{m: float(r[m]) for m in METRICS},
        }
        for r in mine
        if list(r["breached"])
    ]
    return True


async def wait_retrain(
    nc: Any, settings: Settings, champion: int, out: TextIO
) -> RetrainJob | None:
    """The retrainer's job for the champion's drift once it has ended; None when it has not
    within ``RETRAIN_TIMEOUT_S`` (said why, with where to look)."""
    jid = f"{MODEL}.drift.v{champion}"
    deadline = time.monotonic() + RETRAIN_TIMEOUT_S
    said = ""
    next_say = 0.0
    while True:
        job = next((j for j in await list_jobs(nc, settings, MODEL) if j.job_id == jid), None)
        if job is not None and job.state != "running":
            return job
        state = "waiting for the retrainer to take it" if job is None else job.state
        line = f"  retrain job {jid}: {state}" + (
            f" (bound EVENTS seq {job.bound}, {job.rows:,} training rows)"
            if job is not None and job.rows
            else ""
        )
        if line != said or time.monotonic() > next_say:
            say(out, line)
            said, next_say = line, time.monotonic() + 5.0
        if time.monotonic() > deadline:
            return None
        await asyncio.sleep(0.25)


async def agreement(nc: Any, served: int, shadow: int) -> dict[str, float]:
    rows = [
        r
        for r in await sql(nc, agreement_sql(MODEL))
        if str(r["served_version"]) == str(served) and str(r["shadow_version"]) == str(shadow)
    ]
    n = sum(int(r["n"]) for r in rows)
    if not n:
        return {"n": 0}
    return {
        "n": n,
        "mean_abs_diff": sum(float(r["mean_abs_diff"]) * int(r["n"]) for r in rows) / n,
        "max_abs_diff": max(float(r["max_abs_diff"]) for r in rows),
        "flips": sum(int(r["flips"]) for r in rows),
    }


async def backtest(
    nc: Any, reg: ModelRegistry, version: int, t_from_ms: int, t_to_ms: int, out: TextIO
) -> BacktestReport:
    candidate = await reg.get(MODEL, version)
    source = candidate.provenance.label_source
    if source is None:  # the retrainer copies the champion's: not expected
        raise NoLabelSource(f"{MODEL} v{version} names no label source")

    async def query(q: str) -> pa.Table:
        table: pa.Table = await sql_client.query(nc, q, timeout=120)
        return table

    return await run_backtest(
        query,
        await reg.artifact(candidate),
        candidate,
        source,
        t_from_ms,
        t_to_ms,
        lambda line: say(out, "  " + line),
    )


async def decide(
    nc: Any, reg: ModelRegistry, settings: Settings, version: int, report: DemoReport
) -> None:
    """Ask governance to move the challenger on (shadow -> canary); keep its decision as
    the audit trail recorded it."""
    t0 = int(time.time() * 1000) - 1
    decision: dict[str, Any] = {"to": "canary", "version": version}
    try:
        decision["stage"] = await advance(
            reg, MODEL, version, requester="demo", canary_share=settings.retrain_canary_share
        )
        decision["allow"] = True
    except PromotionDenied as exc:
        decision.update(allow=False, stage="shadow", message=exc.message)
    decision["canary_share"] = settings.retrain_canary_share
    audit = f"""
        SELECT decision_id, allow, reasons, policy_version FROM myelin.audit FINAL
        WHERE action = 'promote' AND subject = '{MODEL}:v{version}'
          AND toUnixTimestamp64Milli(ts) >= {t0}
        ORDER BY ts DESC LIMIT 1"""
    deadline = time.monotonic() + 30.0
    while time.monotonic() < deadline:
        rows = await sql(nc, audit)
        if rows:
            decision.update(
                decision_id=rows[0]["decision_id"],
                reasons=list(rows[0]["reasons"]),
                policy_version=rows[0]["policy_version"],
            )
            break
        await asyncio.sleep(0.2)
    report.loop.decision = decision


async def run_loop(
    nc: Any,
    settings: Settings,
    stream: DemoStream,
    champion: int,
    report: DemoReport,
    out: TextIO,
) -> None:
    loop = report.loop
    reg = ModelRegistry(nc, bus.jetstream(nc, settings))
    mv = await reg.get(MODEL, champion)
    policy = mv.reference.policy if mv.reference is not None else DriftPolicy()
    loop.thresholds = {m: float(getattr(policy, m)) for m in METRICS}
    loop.thresholds["min_samples"] = float(policy.min_samples)

    say(out, "Loop 1/4: the newest normal traffic, each impression scored before it is shown ...")
    # The replay goes user by user, round by round (a round scores each user's next
    # impression), so its later rounds hold only the later items of long sessions: judged
    # apart, a round would look like drift. It starts as a window starts and takes well
    # under one: the monitor judges it whole.
    first = await _window_edge(nc)
    await replay(nc, settings, stream.replay, report, out)
    loop.replay_windows = int((await health(nc, "inference"))["drift_windows"]) - first + 1
    await judge_before(nc, champion, policy, report)
    say(
        out,
        f"  the drift monitor judged {loop.before_rows_judged:,} of those scores: "
        f"{'no drift' if not loop.before_breaches else 'DRIFT'}",
    )

    say(out, f"Loop 2/4: the flash sale starts ({len(stream.surge.hot):,} users binge) ...")
    prefix = stream.surge.take(stream.sale_events)
    stream.surge.anchor(prefix, int(time.time() * 1000) - 100)
    loop.sale_events = len(prefix)
    loop.sale_start_ms = prefix[0]["event_time"] if prefix else int(time.time() * 1000)
    await ingest(
        settings, prefix, report, out, label="ingest (the sale so far)", resend_first=False
    )
    await applied(nc, settings)
    async with LiveTraffic(settings, stream, report) as live:
        say(out, "  the sale goes on live: a Predict before every impression ...")
        if not await live.guard(wait_drift(nc, champion, report, out)):
            return
        t0 = time.perf_counter()
        job = await live.guard(wait_retrain(nc, settings, champion, out))
        loop.retrain_s = time.perf_counter() - t0
        if job is None:
            loop.stopped = (
                f"the retrain job {MODEL}.drift.v{champion} did not end in "
                f"{RETRAIN_TIMEOUT_S:.0f} s: see `myelin models retrains {MODEL}` and the "
                "retrainer's log"
            )
            say(out, "  " + loop.stopped)
            return
        loop.job = msgspec.to_builtins(job)
        if not job.version:
            loop.stopped = f"the retrain job {job.job_id} {job.state}: {job.reason}"
            return
        loop.challenger = job.version
        cmv = await reg.get(MODEL, job.version)
        loop.challenger_metrics = dict(cmv.metrics)
        loop.challenger_labels = dict(cmv.labels)
        if cmv.reference is not None:  # judged by the champion's policy
            cp = cmv.reference.policy
            loop.challenger_thresholds = {m: float(getattr(cp, m)) for m in METRICS}
            loop.challenger_thresholds["min_samples"] = float(cp.min_samples)
        loop.sale_rows_in_training = await count(
            nc,
            f"SELECT countIf(ts >= fromUnixTimestamp64Milli(toInt64({loop.sale_start_ms}), "
            f"'UTC')) AS n FROM ({cmv.provenance.training_query})",
        )
        loop.in_shadow = (await reg.routes(MODEL)).shadow == job.version
        say(
            out,
            f"  job {job.job_id} {job.state}: {MODEL} v{job.version}"
            + (" in shadow" if loop.in_shadow else f" ({job.reason})"),
        )
        if not loop.in_shadow:
            loop.stopped = f"governance did not put v{job.version} in shadow: {job.reason}"
            return
        say(out, f"Loop 3/4: v{job.version} in shadow for {SHADOW_S:.0f} s of live traffic ...")
        live.set_phase("shadow")
        t_from = int(time.time() * 1000)
        await live.guard(asyncio.sleep(SHADOW_S))
        t_to = int(time.time() * 1000)
        live.set_phase("outcomes")
        # every shadowed score gets its outcome window of live traffic
        await live.guard(asyncio.sleep(OUTCOME_WINDOW_S + 1.0))
    loop.backtest_period_ms = (t_from, t_to)

    say(out, "Loop 4/4: backtest, agreement, governance ...")
    await wait_features(nc, settings, None)
    await wait_rows(  # every served score in the ledger
        nc,
        f"SELECT count() AS n FROM myelin.inferences FINAL WHERE model = '{MODEL}' "
        "AND api = 'predict' AND route != 'shadow'",
        report.predictions,
    )
    loop.shadow_rows = await stable_count(
        nc,
        f"SELECT count() AS n FROM myelin.inferences FINAL WHERE model = '{MODEL}' "
        "AND api = 'predict' AND route = 'shadow'",
    )
    loop.agreement = await agreement(nc, champion, loop.challenger)
    try:
        bt = await backtest(nc, reg, loop.challenger, t_from, t_to, out)
    except BacktestError as exc:
        loop.backtest_error = exc.message
    else:
        loop.backtest_text = format_backtest(bt)
        loop.backtest = {
            "rows": bt.rows,
            "served_rows": bt.served_rows,
            "served": dict(bt.served),
            "candidate": dict(bt.candidate),
            "groups": [(g.model_version, g.route, g.served["n"]) for g in bt.groups],
        }
    await decide(nc, reg, settings, loop.challenger, report)
