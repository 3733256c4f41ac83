"""The fault harness: the whole platform under a steady load, with seeded faults.

    python -m faults.harness --mode short     # CI's version (about two minutes)
    python -m faults.harness --mode full      # every fault at full length (make faults)
    python -m faults.harness --mode soak --minutes 10
    python -m faults.harness --mode short --no-dedupe   # the control: must FAIL

A run starts the embedded stack (supervised, two ingest workers), registers a model, sends a
seeded clickstream through every ingest door at a steady rate (at least once: batches are
retried with the same ids) while Predict traffic flows, and injects faults at seeded times:
kill -9 of features, warehouse, ingest and inference; SIGSTOP of the features process and of
an ingest worker past their ack waits; nats-server killed and restarted, once briefly and
once for longer than the services' publish retry budget; redis-server killed and restarted;
the warehouse down for a while. When everything has drained, the checker classifies every
acknowledged event (stored once / lost / duplicated) and compares the final Redis vectors
and ClickHouse aggregates with an undisturbed run of the same events on a fresh stack.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import random
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import psutil
import pyarrow as pa

from faults.checker import Classification, FinalState, classify, compare
from faults.load import Load, LoadStats
from faults.workload import Workload, clickstream
from myelin import bus, online, redis_users, sql_client
from myelin.models import ModelRegistry, Provenance
from myelin.online import OnlineReader
from myelin.settings import Settings
from myelin.stack.process import free_port
from myelin.stack.supervisor import Stack, with_ports
from myelin.subjects import EVENTS_STREAM, FEATURES_STREAM, health_subject

log = logging.getLogger("faults")
VIEW = "user_activity"
ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mode:
    name: str
    duration_s: float  # of the load; the faults are spread over it
    rate: float  # events per second
    warehouse_down_s: float
    nats_short_s: float
    ack_wait_s: float  # features' and the inbox's ack wait (SIGSTOPs last past it)
    faults: tuple[str, ...]
    fault_share: float = 0.85  # the faults are spread over this first share of the load
    features_workers: int = 1  # features processes sharing the partitions

    @property
    def events(self) -> int:
        return int(self.duration_s * self.rate)


MODES = {
    "short": Mode(
        "short",
        duration_s=70,
        rate=2_500,
        warehouse_down_s=8,
        nats_short_s=2,
        ack_wait_s=3,
        faults=(
            "kill features",
            "kill ingest",
            "long nats outage",
            "stop features",
            "kill warehouse",
            "restart nats",
            "kill inference",
            "restart redis",
            "stop ingest-2",
            "warehouse down",
        ),
    ),
    # partition-owned features workers: kill -9 one, and another while its partitions move
    "workers": Mode(
        "workers",
        duration_s=45,
        rate=2_500,
        warehouse_down_s=5,
        nats_short_s=2,
        ack_wait_s=3,
        faults=(
            "kill features-2 mid-rebalance",
            "stop features-3",
            "kill features",
            "restart nats",
        ),
        features_workers=3,
    ),
    "full": Mode(
        "full",
        duration_s=240,
        rate=3_000,
        warehouse_down_s=60,
        nats_short_s=3,
        ack_wait_s=10,
        faults=(
            "kill features",
            "kill ingest",
            "long nats outage",
            "stop features",
            "kill warehouse",
            "restart nats",
            "kill inference",
            "restart redis",
            "stop ingest-2",
            "kill features",
            "warehouse down",
            "kill ingest-2",
            "restart redis",
            "kill features",
        ),
    ),
}


@dataclass
class FaultLog:
    entries: list[tuple[float, str, str]] = field(default_factory=list)  # (t, fault, outcome)

    def add(self, t0: float, fault: str, outcome: str) -> None:
        self.entries.append((time.monotonic() - t0, fault, outcome))


@dataclass
class RunResult:
    label: str
    load: LoadStats | None
    state: FinalState
    classification: Classification | None
    faults: FaultLog
    predictions_ok: int = 0
    predictions_failed: int = 0
    inference_records: int = 0
    restarts: dict[str, int] = field(default_factory=dict)
    rss_mb: dict[str, tuple[float, float]] = field(default_factory=dict)  # (end, peak)
    lag_end: dict[str, int] = field(default_factory=dict)
    drained_s: float = 0.0
    wall_s: float = 0.0
    stored_twice: int = 0
    # features worker -> (partitions it holds at the end, partitions it gained or gave up)
    partitions: dict[str, tuple[list[int], int]] = field(default_factory=dict)


def publish_budget_s(settings: Settings) -> float:
    """How long ingest keeps retrying a publish (bus.Publisher) before it answers "retry":
    every attempt waits up to the publish timeout, with 50 ms doubling (to 2 s) between."""
    n = settings.publish_retries + 1
    return n * settings.publish_timeout_s + sum(min(0.05 * float(1 << k), 2.0) for k in range(n))


def long_outage_s(settings: Settings) -> float:
    """Longer than ingest's publish retry budget: producers are told to retry, and do."""
    return round(publish_budget_s(settings) + 5)


def stack_settings(state_dir: Path, mode: Mode, dedupe: bool) -> Settings:
    base = replace(
        Settings.from_env(),
        state_dir=state_dir,
        ingest_workers=2,
        features_workers=mode.features_workers,
        features_ack_wait_s=mode.ack_wait_s,
        ingest_ack_wait_s=mode.ack_wait_s,
        dedupe=dedupe,
        publish_timeout_s=2.0,
    )
    return with_ports(
        base,
        nats_port=free_port(),
        redis_port=free_port(),
        ingest_http_port=free_port(),
        inference_grpc_port=free_port(),
        warehouse_http_port=free_port(),
        ops_http_port=free_port(),
    )


# ----------------------------------------------------------------------------- faults


def fault_length_s(fault: str, mode: Mode, settings: Settings) -> float:
    """How long a fault lasts (for spacing them over the load)."""
    if fault.startswith("stop "):
        return mode.ack_wait_s + 2.5
    if fault.endswith(" mid-rebalance"):
        return settings.features_lease_s * 1.2 + 0.5
    return {
        "restart nats": mode.nats_short_s,
        "long nats outage": long_outage_s(settings),
        "restart redis": 1.0,
        "warehouse down": mode.warehouse_down_s,
    }.get(fault, 0.5)


async def inject(stack: Stack, fault: str, mode: Mode, rng: random.Random) -> str:
    """One fault; returns what happened, for the report."""
    what, _, target = fault.partition(" ")
    if fault.endswith(" mid-rebalance"):
        # one worker killed; while its partitions move (its leases expire, the supervisor
        # starts it again), the next one is killed too
        first = stack.child(target.split()[0])
        pid1 = first.pid
        first.kill()
        await asyncio.sleep(stack.settings.features_lease_s * (0.7 + 0.5 * rng.random()))
        n = int(target.split()[0].rsplit("-", 1)[1]) % mode.features_workers + 1
        second = stack.child(f"features-{n}" if n > 1 else "features")
        pid2 = second.pid
        second.kill()
        return f"SIGKILL pid {pid1}, then pid {pid2} while the partitions moved"
    if what == "kill":
        child = stack.child(target)
        pid = child.pid
        child.kill()  # SIGKILL, mid-batch: the load never pauses
        return f"SIGKILL pid {pid}; the supervisor restarts it"
    if what == "stop":
        child = stack.child(target)
        pid = child.pid
        assert pid is not None
        pause = mode.ack_wait_s + 2 + rng.random()
        os.kill(pid, signal.SIGSTOP)
        await asyncio.sleep(pause)
        os.kill(pid, signal.SIGCONT)
        return f"SIGSTOP pid {pid} for {pause:.1f}s (ack wait {mode.ack_wait_s:.0f}s), SIGCONT"
    if fault == "restart nats":
        return await _outage(stack, "nats-server", mode.nats_short_s)
    if fault == "long nats outage":
        budget = publish_budget_s(stack.settings)
        text = await _outage(stack, "nats-server", long_outage_s(stack.settings))
        return f"{text} (ingest's publish retry budget: {budget:.0f}s)"
    if fault == "restart redis":
        return await _outage(stack, "redis-server", 1.0)
    if fault == "warehouse down":
        return await _outage(stack, "warehouse", mode.warehouse_down_s)
    raise ValueError(f"unknown fault {fault!r}")


async def _outage(stack: Stack, name: str, seconds: float) -> str:
    async with stack.unsupervised(name) as child:
        pid = child.pid
        child.kill()
        await asyncio.sleep(seconds)
    return f"SIGKILL pid {pid}, down {seconds:.0f}s, started again"


async def run_faults(
    stack: Stack, mode: Mode, seed: int, duration_s: float, log_: FaultLog, t0: float
) -> None:
    """The mode's faults one after another, spread over the load's first ``fault_share``
    with seeded jitter, so each one hits a platform under load (and none overlaps the
    next)."""
    rng = random.Random(seed)
    lengths = [fault_length_s(f, mode, stack.settings) for f in mode.faults]
    gap = max(1.0, (mode.fault_share * duration_s - sum(lengths)) / (len(lengths) + 1))
    at = t0
    for fault, length in zip(mode.faults, lengths, strict=True):
        at += gap * (0.6 + 0.8 * rng.random())
        await asyncio.sleep(max(0.0, at - time.monotonic()))
        at = max(at, time.monotonic()) + length
        try:
            outcome = await inject(stack, fault, mode, rng)
        except Exception as exc:
            outcome = f"INJECTION FAILED: {exc!r}"
        log_.add(t0, fault, outcome)
        log.info("fault %-18s %s", fault, outcome)


# ----------------------------------------------------------------------------- model + Predict


async def register_model(settings: Settings) -> None:
    """A small CTR model on the view's features, promoted to champion."""
    from myelin.demo.trainer import train
    from services.features.views import USER_ACTIVITY

    features = list(USER_ACTIVITY.feature_names)
    rng = np.random.default_rng(0)
    rows = 2000
    cols = {f: rng.poisson(3, rows).astype(np.float64) for f in features}
    logit = 0.8 * cols["clicks_1h"] - 0.3 * cols["impressions_1h"] + rng.normal(0, 1, rows)
    table = pa.table(
        {
            **cols,
            "label": (logit > 0).astype(np.int64),
            "ts": pa.array(np.arange(rows) * 1000, pa.timestamp("ms")),
        }
    )
    t = train(table, features)
    nc = await bus.connect(settings, "faults-model", identity="admin")
    try:
        reg = ModelRegistry(nc, bus.jetstream(nc, settings))
        mv = await reg.register(
            "ctr",
            t.onnx,
            inputs=t.inputs,
            outputs=t.outputs,
            provenance=Provenance(
                training_window=list(t.window),
                feature_views=[f"{VIEW}@{USER_ACTIVITY.content_hash}"],
                feature_view=VIEW,
                features=t.features,
                training_rows=t.train_rows,
            ),
            metrics=t.metrics,
        )
        await reg.set_alias("ctr", "champion", mv.version, requester="faults")
    finally:
        await nc.close()


async def predict_load(settings: Settings, users: list[str], stop: asyncio.Event) -> dict[str, int]:
    """Predict traffic from its own process (see :mod:`faults.predict_load`) until ``stop``."""
    target = f"{settings.host}:{settings.inference_grpc_port}"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "faults.predict_load",
        target,
        *users[:200],
        stdout=asyncio.subprocess.PIPE,
        cwd=str(ROOT),
        env={**os.environ, "MYELIN_STATE_DIR": str(settings.state_dir)},
    )
    await stop.wait()
    proc.send_signal(signal.SIGTERM)
    out, _ = await proc.communicate()
    counts: dict[str, int] = msgspec.json.decode(out.strip().splitlines()[-1])
    return counts


# ----------------------------------------------------------------------------- drain + state


async def _health(nc: Any, name: str) -> dict[str, Any]:
    result: dict[str, Any] = msgspec.json.decode(
        await bus.request(nc, health_subject(name), {}, timeout=5)
    )
    return result


async def worker_partitions(settings: Settings, workers: int) -> dict[str, tuple[list[int], int]]:
    """Each features worker's partitions and how many times its partitions moved."""
    nc = await bus.connect(settings, "faults-partitions", identity="admin")
    try:
        out: dict[str, tuple[list[int], int]] = {}
        for k in range(1, workers + 1):
            name = "features" if k == 1 else f"features-{k}"
            h = await _health(nc, name)
            out[name] = (list(h.get("partitions", [])), int(h.get("partition_moves", 0)))
        return out
    finally:
        await nc.close()


async def wait_drained(settings: Settings, timeout_s: float = 300.0) -> float:
    """Until every feature view version has applied the whole EVENTS stream and the
    warehouse has stored EVENTS and FEATURES to their ends; returns how long it took."""
    t0 = time.monotonic()
    nc = await bus.connect(settings, "faults-drain", identity="admin")
    try:
        js = bus.jetstream(nc, settings)
        while True:
            try:
                last = (await js.stream_info(EVENTS_STREAM)).state.last_seq
                h = await _health(nc, "features")
                applied = all(v["position"] >= last for v in h["versions"])
                if applied:
                    features_last = (await js.stream_info(FEATURES_STREAM)).state.last_seq
                    events_at, features_at = await sql_client.stored_positions(nc)
                    if events_at >= last and features_at >= features_last:
                        return time.monotonic() - t0
            except Exception as exc:
                log.debug("not drained yet: %r", exc)
            if time.monotonic() - t0 > timeout_s:
                raise TimeoutError(f"the platform did not drain within {timeout_s:.0f}s")
            await asyncio.sleep(0.5)
    finally:
        await nc.close()


async def stream_seqs(settings: Settings) -> dict[int, str]:
    """Event sequence (stream sequence x 1000 + index) -> event id, for every event stored
    on the EVENTS stream, copies included: the stream, not raw history (where ClickHouse
    collapses copies), says which copy a feature row came from."""
    from nats.js import api

    from myelin.contracts import StreamEvent

    decode = msgspec.msgpack.Decoder(list[StreamEvent])
    out: dict[int, str] = {}
    nc = await bus.connect(settings, "faults-stream", identity="admin")
    try:
        js = bus.jetstream(nc, settings)
        last = (await js.stream_info(EVENTS_STREAM)).state.last_seq
        cfg = api.ConsumerConfig(
            ack_policy=api.AckPolicy.NONE, inactive_threshold=30.0, max_ack_pending=-1
        )
        sub = await js.pull_subscribe("myelin.events.>", stream=EVENTS_STREAM, config=cfg)
        seen = 0
        while seen < last:
            for m in await sub.fetch(2000, timeout=10):
                seq = m.metadata.sequence.stream
                seen = max(seen, seq)
                for i, ev in enumerate(decode.decode(m.data)):
                    out[seq * 1000 + i] = ev.event_id
        await sub.unsubscribe()
    finally:
        await nc.close()
    return out


async def final_state(
    settings: Settings, workload: Workload
) -> tuple[FinalState, dict[str, int], dict[str, int], int, int]:
    """The final state; per event id its effects (feature rows) and raw history rows; the
    inference records stored; how many events the EVENTS stream holds more than once."""
    redis = online.connect(redis_users.client_url(settings, "admin"))
    nc = await bus.connect(settings, "faults-state", identity="admin")
    try:
        reader = OnlineReader(redis)
        version = await reader.served_version(VIEW)
        vectors = {
            v.entity_id: (v.as_of_ms, v.values)
            for v in await reader.read(VIEW, workload.entities, version=version, now_ms=0)
        }

        async def q(sql: str) -> list[dict[str, Any]]:
            t = await sql_client.query(nc, sql, timeout=300)
            rows: list[dict[str, Any]] = t.to_pylist()
            return rows

        fv = f"myelin.feature_values FINAL WHERE view = '{VIEW}' AND view_hash = '{version}'"
        fv_seqs = [r["stream_seq"] for r in await q(f"SELECT stream_seq FROM {fv}")]
        raw_rows = await q(
            "SELECT event_id, count() AS n FROM myelin.events FINAL GROUP BY event_id"
        )
        agg_rows = await q(
            "SELECT type, count() AS n, sum(JSONExtractFloat(data, 'amount')) AS amount "
            "FROM myelin.events FINAL GROUP BY type"
        )
        per_entity = await q(
            f"SELECT entity_id, count() AS n, argMax(values, stream_seq) AS last FROM {fv} "
            "GROUP BY entity_id"
        )
        [inf] = await q("SELECT count() AS n FROM myelin.inferences FINAL")
        names = list((await reader.meta(VIEW, version)).features)
    finally:
        await nc.close()
        await redis.aclose()
    aggregates: dict[str, float] = {}
    for r in agg_rows:
        aggregates[f"events.{r['type']}.count"] = float(r["n"])
        aggregates[f"events.{r['type']}.amount"] = float(r["amount"])
    aggregates["feature_rows"] = float(sum(r["n"] for r in per_entity))
    state = FinalState(
        vectors=vectors,
        aggregates=aggregates,
        rows_per_entity={r["entity_id"]: int(r["n"]) for r in per_entity},
        last_rows={
            r["entity_id"]: tuple(float(dict(r["last"])[n]) for n in names) for r in per_entity
        },
    )
    ids = await stream_seqs(settings)
    effects: dict[str, int] = {}
    for seq in fv_seqs:
        eid = ids.get(seq, f"<no event at seq {seq}>")
        effects[eid] = effects.get(eid, 0) + 1
    copies: dict[str, int] = {}
    for eid in ids.values():
        copies[eid] = copies.get(eid, 0) + 1
    raw = {r["event_id"]: int(r["n"]) for r in raw_rows}
    twice = sum(1 for n in copies.values() if n > 1)
    return state, effects, raw, int(inf["n"]), twice


def rss_of(stack: Stack) -> dict[str, float]:
    out: dict[str, float] = {}
    for name in [*stack.procs, "nats-server", "redis-server"]:
        with contextlib.suppress(Exception):
            pid = stack.child(name).pid
            if pid:
                out[name] = psutil.Process(pid).memory_info().rss / 2**20
    return out


def format_rss(sample: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.0f}" for k, v in sorted(sample.items()))


async def sample_rss(
    stack: Stack,
    peaks: dict[str, float],
    timeline: list[tuple[float, dict[str, float]]],
    stop: asyncio.Event,
    every_s: float = 10.0,
) -> None:
    """Peaks every second, and a sample for the timeline every ``every_s``."""
    t0 = time.monotonic()
    next_sample = t0
    while not stop.is_set():
        now = rss_of(stack)
        for k, v in now.items():
            peaks[k] = max(peaks.get(k, 0.0), v)
        if time.monotonic() >= next_sample:
            timeline.append((time.monotonic() - t0, now))
            next_sample += every_s
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 1.0)


async def lag_now(settings: Settings) -> dict[str, int]:
    nc = await bus.connect(settings, "faults-lag", identity="admin")
    try:
        js = bus.jetstream(nc, settings)
        last = (await js.stream_info(EVENTS_STREAM)).state.last_seq
        h = await _health(nc, "features")
        w = await _health(nc, "warehouse")
        lag = {
            f"features {v['view']}@{v['version'][:8]}": last - v["position"] for v in h["versions"]
        }
        lag |= {f"warehouse {k}": int(v) for k, v in w["pending"].items()}
        return lag
    finally:
        await nc.close()


# ----------------------------------------------------------------------------- runs


@dataclass
class Parts:
    """Everything a faulted run measured."""

    load: LoadStats
    state: FinalState
    effects: dict[str, int]
    raw: dict[str, int]
    inference_records: int
    faults: FaultLog
    predictions: dict[str, int]
    restarts: dict[str, int]
    rss_end: dict[str, float]
    rss_peak: dict[str, float]
    rss_timeline: list[tuple[float, dict[str, float]]]  # while the load ran
    rss_after_drain: tuple[float, dict[str, float]]  # after the final queries, too
    lag_at_end: dict[str, int]  # when the load stopped, before draining
    drained_s: float
    wall_s: float
    stored_twice: int  # events the EVENTS stream holds more than once (dedupe's work)
    partitions: dict[str, tuple[list[int], int]]


async def faulted_run_parts(
    mode: Mode,
    workload: Workload,
    state_dir: Path,
    *,
    seed: int,
    dedupe: bool = True,
    inject_faults: bool = True,
) -> Parts:
    settings = stack_settings(state_dir, mode, dedupe)
    faults = FaultLog()
    t_start = time.monotonic()
    async with Stack(settings, supervise=True, log=lambda m: log.info("stack: %s", m)) as stack:
        await register_model(settings)
        stop = asyncio.Event()
        peaks: dict[str, float] = {}
        timeline: list[tuple[float, dict[str, float]]] = []
        sampler = asyncio.create_task(sample_rss(stack, peaks, timeline, stop))
        predictor = asyncio.create_task(predict_load(settings, workload.entities, stop))
        load = Load(settings, workload, rate=mode.rate)
        duration = len(workload.events) / mode.rate
        t0 = time.monotonic()
        fault_task = asyncio.create_task(
            run_faults(stack, mode, seed, duration, faults, t0)
            if inject_faults
            else asyncio.sleep(0)
        )
        stats = await load.run()
        await fault_task
        stop.set()
        counts, _ = await asyncio.gather(predictor, sampler)
        lag = await lag_now(settings)
        drained = await wait_drained(settings)
        state, effects, raw, inf, twice = await final_state(settings, workload)
        end_rss = rss_of(stack)
        after_drain = (time.monotonic() - t0, end_rss)
        restarts = dict(stack.restarts)
        partitions = await worker_partitions(settings, mode.features_workers)
    return Parts(
        load=stats,
        state=state,
        effects=effects,
        raw=raw,
        inference_records=inf,
        faults=faults,
        predictions=counts,
        restarts=restarts,
        rss_end=end_rss,
        rss_peak=peaks,
        rss_timeline=timeline,
        rss_after_drain=after_drain,
        lag_at_end=lag,
        drained_s=drained,
        wall_s=time.monotonic() - t_start,
        stored_twice=twice,
        partitions=partitions,
    )


async def faulted_run(
    mode: Mode,
    workload: Workload,
    state_dir: Path,
    *,
    seed: int,
    dedupe: bool = True,
    inject_faults: bool = True,
) -> RunResult:
    p = await faulted_run_parts(
        mode, workload, state_dir, seed=seed, dedupe=dedupe, inject_faults=inject_faults
    )
    return RunResult(
        label=f"faulted{'' if dedupe else ', dedupe OFF'}",
        load=p.load,
        state=p.state,
        classification=classify(p.load.acked, p.effects, p.raw),
        faults=p.faults,
        predictions_ok=p.predictions["ok"],
        predictions_failed=p.predictions["failed"],
        inference_records=p.inference_records,
        restarts=p.restarts,
        rss_mb={k: (v, max(v, p.rss_peak.get(k, 0.0))) for k, v in p.rss_end.items()},
        lag_end=p.lag_at_end,
        drained_s=p.drained_s,
        wall_s=p.wall_s,
        stored_twice=p.stored_twice,
        partitions=p.partitions,
    )


async def undisturbed_run(mode: Mode, workload: Workload, state_dir: Path) -> RunResult:
    """The same events, each once, in order, through one door, no faults."""
    settings = stack_settings(state_dir, mode, dedupe=True)
    t_start = time.monotonic()
    async with Stack(settings, log=lambda m: log.debug("stack: %s", m)):
        plain = Workload(workload.events, resend_every=0)
        stats = await Load(settings, plain, rate=50_000, batch=1000, doors=("http",)).run()
        drained = await wait_drained(settings)
        state, effects, raw, _, _ = await final_state(settings, workload)
    result = RunResult("undisturbed", stats, state, classify(stats.acked, effects, raw), FaultLog())
    result.drained_s = drained
    result.wall_s = time.monotonic() - t_start
    return result


@dataclass
class Report:
    mode: str
    seed: int
    events: int
    resend_every: int
    faulted: RunResult
    reference: RunResult | None
    diffs: list[str]

    @property
    def passed(self) -> bool:
        c = self.faulted.classification
        return c is not None and c.ok and not self.diffs and not self.faulted.load.gave_up  # type: ignore[union-attr]


def format_report(r: Report) -> str:
    f = r.faulted
    c = f.classification
    assert c is not None and f.load is not None
    lines = [
        f"fault harness, mode {r.mode}, seed {r.seed}: {r.events:,} events "
        f"(every {r.resend_every}th also sent again later, in another batch through another door)",
        "",
        "faults injected:",
        *(f"  {t:7.1f}s  {name:<18} {outcome}" for t, name, outcome in f.faults.entries),
        "",
        f"load: {f.load.events_acked:,} acknowledgements for {len(f.load.acked):,} event ids, "
        f"batch retries {dict(f.load.retries)}, never taken {len(f.load.gave_up)}",
        f"      retry causes: {dict(f.load.errors.most_common(8))}",
        f"events stored more than once on the EVENTS stream (resent, other worker or "
        f"door, retried after a crash): {f.stored_twice:,}",
        f"automatic restarts by the supervisor: { {k: v for k, v in f.restarts.items() if v} }",
        *(
            [
                "features workers (partitions at the end; partition moves since its start): "
                + ", ".join(f"{w} {parts} ({moves})" for w, (parts, moves) in f.partitions.items())
            ]
            if len(f.partitions) > 1
            else []
        ),
        f"drained {f.drained_s:.1f}s after the load ended; run took {f.wall_s:.0f}s",
        "",
        f"{'events':<28}{'stored once':>12}{'lost':>8}{'duplicated':>12}{'not in raw history':>20}",
        f"{f.label:<28}{c.stored_once:>12,}{c.lost:>8,}{c.duplicated:>12,}{c.missing_raw:>20,}",
    ]
    if r.reference is not None and r.reference.classification is not None:
        rc = r.reference.classification
        lines.append(
            f"{'undisturbed':<28}{rc.stored_once:>12,}{rc.lost:>8,}{rc.duplicated:>12,}{rc.missing_raw:>20,}"
        )
    if c.lost_ids:
        lines.append(f"  lost, e.g.: {c.lost_ids[:10]}")
    if c.duplicated_ids:
        lines.append(f"  duplicated, e.g.: {c.duplicated_ids[:10]}")
    lines += [
        "",
        "final state vs the undisturbed run: "
        + ("EQUAL" if not r.diffs else f"{len(r.diffs)} DIFFERENCES")
        + f" ({len(f.state.vectors):,} online vectors, {len(f.state.aggregates)} aggregates, "
        f"{sum(f.state.rows_per_entity.values()):,} feature rows)",
        *(f"  {d}" for d in r.diffs[:15]),
        "",
        f"Predict: {f.predictions_ok:,} answered, {f.predictions_failed:,} failed "
        f"(while inference restarted); {f.inference_records:,} inference records stored",
        "memory (RSS MB, end / peak): "
        + ", ".join(f"{k} {end:.0f}/{peak:.0f}" for k, (end, peak) in sorted(f.rss_mb.items())),
        f"lag when the load stopped (messages): {f.lag_end}",
        "",
        "RESULT: " + ("PASS" if r.passed else "FAIL"),
    ]
    return "\n".join(lines)


async def run(
    mode_name: str,
    seed: int,
    dedupe: bool,
    workdir: Path,
    faults_on: bool = True,
    events: int = 0,
) -> Report:
    mode = MODES[mode_name]
    if events:
        mode = replace(mode, duration_s=events / mode.rate)
    start_ms = int(time.time() * 1000) - 30 * 60_000
    workload = clickstream(mode.events, seed=seed, start_ms=start_ms)
    faulted = await faulted_run(
        mode, workload, workdir / "faulted", seed=seed, dedupe=dedupe, inject_faults=faults_on
    )
    reference = await undisturbed_run(mode, workload, workdir / "undisturbed")
    diffs = compare(faulted.state, reference.state)
    return Report(
        mode_name, seed, len(workload.events), workload.resend_every, faulted, reference, diffs
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m faults.harness", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--mode", choices=[*MODES, "soak"], default="short")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--no-dedupe", action="store_true", help="the control run: must fail")
    p.add_argument(
        "--no-faults", action="store_true", help="no faults (the control's resends only)"
    )
    p.add_argument("--minutes", type=float, default=10.0, help="soak length")
    p.add_argument("--events", type=int, default=0, help="override the mode's event count")
    p.add_argument("--keep", action="store_true", help="keep the state directories")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    workdir = Path(tempfile.mkdtemp(prefix="myelin-faults-"))
    try:
        if args.mode == "soak":
            from faults.soak import run_soak

            ok = asyncio.run(run_soak(args.minutes, args.seed, workdir))
        else:
            report = asyncio.run(
                run(
                    args.mode,
                    args.seed,
                    not args.no_dedupe,
                    workdir,
                    not args.no_faults,
                    args.events,
                )
            )
            print(format_report(report), flush=True)
            ok = report.passed
    finally:
        if not args.keep:
            import shutil

            shutil.rmtree(workdir, ignore_errors=True)
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
