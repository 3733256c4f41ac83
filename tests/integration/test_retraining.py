"""Retrain jobs on real engines: nats-server (registry, job store, audit), the Rego
governance service in process and chdb holding raw events and feature rows written as the
warehouse's drains write them. The job's pure parts run as the service runs them; only
"has the warehouse stored up to the bound" is answered by this test, which wrote it."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pyarrow as pa
import pytest
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from myelin import bus
from myelin.audit import AuditLog
from myelin.models import LabelSource, ModelRegistry, PromotionDenied, Provenance
from myelin.records import AuditRecord, DriftDetected, FeatureRow, FeatureRows
from myelin.retraining import (
    JobStore,
    Retrainer,
    RetrainJob,
    Trigger,
    advance,
    drift_trigger,
    fingerprint,
)
from myelin.settings import Settings
from myelin.subjects import AUDIT_STREAM, RETRAINS_BUCKET
from myelin.trainers import Fitted, Split, load_trainer, logistic_regression, matrix, train
from myelin.training import EVENT_SEQ_STRIDE, labels_spec, labels_sql, training_set_sql
from myelin.warehouse import Warehouse, arrow_to_ipc, read_only_sql
from services.governance.app import GovernanceApp
from services.retrainer.schedule import run_schedule
from services.warehouse.sink import events_table, feature_values_table
from tests.helpers import RECENT_DAY_MS, stream_event

pytestmark = pytest.mark.integration

VIEW, VERSION = "activity", "ab12cd34"
FEATURES = ["imps", "clicks", "ctr"]
CLICK_WINDOW_S = 30
SPEC = labels_spec("clicked_impressions", CLICK_WINDOW_S)
T0 = RECENT_DAY_MS
ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Stream:
    """Messages of the EVENTS stream as the warehouse stores them: each event with its
    event sequence (stream sequence x 1000 + index in its message), and the feature row
    the view wrote after it."""

    events: list[tuple[int, Any]]
    rows: list[FeatureRow]

    def upto(self, seq: int) -> Stream:
        limit = (seq + 1) * EVENT_SEQ_STRIDE
        return Stream(
            [e for e in self.events if e[0] < limit], [r for r in self.rows if r.stream_seq < limit]
        )

    def after(self, seq: int) -> Stream:
        limit = (seq + 1) * EVENT_SEQ_STRIDE
        return Stream(
            [e for e in self.events if e[0] >= limit],
            [r for r in self.rows if r.stream_seq >= limit],
        )


def clickstream(seed: int = 11, impressions: int = 3000, users: int = 60) -> Stream:
    """Users with a latent click propensity see items; a click follows an impression
    within the click window with that propensity. Up to three events share a message.
    The view counts each user's impressions and clicks so far (and their ratio)."""
    rng = np.random.default_rng(seed)
    propensity = rng.beta(0.7, 2.0, users)
    timeline: list[tuple[int, str, int, int]] = []  # (time ms, type, user, item)
    t = T0
    for _ in range(impressions):
        t += int(rng.integers(200, 2_000))
        user, item = int(rng.integers(users)), int(rng.integers(40))
        timeline.append((t, "impression", user, item))
        if rng.random() < propensity[user]:
            timeline.append((t + int(rng.integers(1_000, 20_000)), "click", user, item))
    timeline.sort()
    counts = np.zeros((users, 2))
    events: list[tuple[int, Any]] = []
    rows: list[FeatureRow] = []
    message, index = 1, 0
    for k, (t, kind, user, item) in enumerate(timeline):
        seq = message * EVENT_SEQ_STRIDE + index
        entity = f"u{user:03d}"
        events.append(
            (seq, stream_event(f"e{k}", entity, t, typ=kind, item_id=f"i{item}", partition=0))
        )
        counts[user, 0 if kind == "impression" else 1] += 1
        imps, clicks = counts[user]
        rows.append(FeatureRow(entity, t, seq, "", [imps, clicks, clicks / imps if imps else 0.0]))
        index += 1
        if index == 3 or rng.random() < 0.4:
            message, index = message + 1, 0
    return Stream(events, rows)


def store(wh: Warehouse, part: Stream) -> None:
    wh.insert_arrow("myelin.events", events_table(part.events))
    batch = FeatureRows(view=VIEW, version=VERSION, features=FEATURES, rows=part.rows)
    wh.insert_arrow("myelin.feature_values", feature_values_table([batch]))


class StoredData:
    """The job's training data, from this process's chdb (what the warehouse service
    answers over NATS), through the analysts' read-only gate."""

    def __init__(self, wh: Warehouse) -> None:
        self.wh = wh

    async def last_seq(self) -> int:
        t = await self.query("SELECT max(stream_seq) AS s FROM myelin.events")
        return int(t.column("s")[0].as_py()) // EVENT_SEQ_STRIDE

    async def feature_version(self, view: str, features: list[str], pinned: str) -> str:
        return pinned

    async def wait_stored(self, bound: int, view: str, version: str, say: Any) -> None:
        return None  # the test stored it before asking

    async def query(self, sql: str) -> pa.Table:
        return await asyncio.to_thread(self.wh.query_arrow, read_only_sql(sql))


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def bounded_sql(bound: int | None) -> str:
    return training_set_sql(
        VIEW, FEATURES, labels_sql(SPEC, max_seq=bound), version=VERSION, max_seq=bound
    ).strip()


@pytest.fixture
async def governance(nc: NATS, settings: Settings) -> AsyncIterator[GovernanceApp]:
    app = GovernanceApp(settings)
    await app.start()
    try:
        yield app
    finally:
        await app.stop()


def retrainer(
    nc: NATS, settings: Settings, wh: Warehouse, jobs: JobStore, lines: list[str], trainer: str = ""
) -> Retrainer:
    js = bus.jetstream(nc, settings)
    return Retrainer(
        registry=ModelRegistry(nc, js),
        data=StoredData(wh),
        jobs=jobs,
        audit=AuditLog(bus.Publisher(js, settings)),
        settings=replace(settings, retrain_min_rows=100),
        trainer=load_trainer(trainer),
        progress=lines.append,
    )


async def champion(nc: NATS, settings: Settings, wh: Warehouse, bound: int) -> Any:
    """v1, trained as the demo trains (its own split), promoted through governance."""
    table = await StoredData(wh).query(bounded_sql(bound))
    trained = train(table, FEATURES)
    reg = ModelRegistry(nc, bus.jetstream(nc, settings))
    mv = await reg.register(
        "ctr",
        trained.onnx,
        inputs=trained.inputs,
        outputs=trained.outputs,
        metrics=trained.metrics,
        labels={"training_labels": SPEC},
        reference=trained.reference,
        provenance=Provenance(
            training_window=list(trained.window),
            feature_views=[f"{VIEW}@{VERSION}"],
            feature_view=VIEW,
            features=FEATURES,
            training_rows=trained.train_rows,
            label_source=LabelSource(kind="event", event_type="click", window_s=CLICK_WINDOW_S),
        ),
    )
    await reg.set_alias("ctr", "champion", mv.version, requester="test")
    return table


def drift(version: int, window_start_ms: int) -> DriftDetected:
    return DriftDetected(
        drift_id=f"ctr:v{version}:{window_start_ms}",
        ts_ms=window_start_ms + 60_000,
        model="ctr",
        model_version=str(version),
        window_start_ms=window_start_ms,
        window_end_ms=window_start_ms + 60_000,
        samples=900,
        drifted=["ctr"],
        columns=[],
        thresholds={},
    )


async def audit_records(js: JetStreamContext) -> list[AuditRecord]:
    psub = await js.pull_subscribe("myelin.audit.>", stream=AUDIT_STREAM)
    dec = msgspec.msgpack.Decoder(AuditRecord)
    out: list[AuditRecord] = []
    try:
        while True:
            try:
                msgs = await psub.fetch(500, timeout=0.5)
            except TimeoutError:
                return out
            out += [dec.decode(m.data) for m in msgs]
    finally:
        await psub.unsubscribe()


def sklearn_holdout(
    train_table: pa.Table, cut: int, holdout: pa.Table
) -> tuple[float, float, np.ndarray[Any, Any]]:
    """AUC and log loss on ``holdout`` of scikit-learn fitted on the first ``cut`` rows of
    ``train_table`` (the default trainer's recipe, without ONNX)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import log_loss, roc_auc_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x, y = matrix(train_table, FEATURES)
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)).fit(x[:cut], y[:cut])
    xh, yh = matrix(holdout, FEATURES)
    p = model.predict_proba(xh)[:, 1]
    return float(roc_auc_score(yh, p)), float(log_loss(yh, p, labels=[0, 1])), p


def shuffled_labels(table: pa.Table, features: list[str], split: Split) -> Fitted:
    """A trainer that learns nothing: the default recipe on permuted labels."""
    labels = table.column("label").to_numpy(zero_copy_only=False)
    permuted = np.random.default_rng(3).permutation(labels)
    noise = table.set_column(table.column_names.index("label"), "label", pa.array(permuted))
    return logistic_regression(noise, features, split)


async def test_a_drift_retrain_is_reproducible_governed_and_runs_once(
    nc: NATS, settings: Settings, warehouse: Warehouse, governance: GovernanceApp
) -> None:
    js = bus.jetstream(nc, settings)
    reg = ModelRegistry(nc, js)
    stream = clickstream()
    last_message = stream.events[-1][0] // EVENT_SEQ_STRIDE
    first, bound = last_message * 2 // 5, last_message * 7 // 10
    store(warehouse, stream.upto(bound))
    champion_table = await champion(nc, settings, warehouse, first)

    # the same drift reported by two windows, to two processes at once: one job trains
    lines: list[str] = []
    a = retrainer(nc, settings, warehouse, await JobStore.open(js), lines)
    b = retrainer(nc, settings, warehouse, await JobStore.open(js), lines)
    runs = await asyncio.gather(
        a.run(drift_trigger(drift(1, 1_000))), b.run(drift_trigger(drift(1, 61_000)))
    )
    assert sorted(r.ran for r in runs) == [False, True], lines
    job = next(r.job for r in runs if r.ran)
    assert (job.job_id, job.state, job.version, job.bound) == ("ctr.drift.v1", "done", 2, bound)
    assert await reg.versions("ctr") == [1, 2]
    assert (await reg.routes("ctr")).shadow == 2  # governance let it into shadow
    # a later window of the same drift: the existing job, nothing trained
    again = await a.run(drift_trigger(drift(1, 121_000)))
    assert not again.ran and again.job.version == 2 and await reg.versions("ctr") == [1, 2]
    assert any("training set:" in ln for ln in lines) and any("holdout" in ln for ln in lines)
    # its process dies after registering v2 (the record still says running, its heartbeat
    # long stopped): the next trigger takes the job over at its bound and finds v2 there
    kv = await js.key_value(RETRAINS_BUCKET)
    crashed = msgspec.structs.replace(job, state="running", heartbeat_ms=1, finished_ms=0)
    await kv.put(job.job_id, msgspec.json.encode(crashed))
    resumed = await b.run(drift_trigger(drift(1, 181_000)))
    assert resumed.ran and (resumed.job.attempt, resumed.job.state) == (2, "done")
    assert (resumed.job.bound, resumed.job.version) == (bound, 2)
    assert await reg.versions("ctr") == [1, 2]
    assert any("registered by an earlier attempt" in ln for ln in lines)

    # the lineage
    mv = await reg.get("ctr", 2)
    table = await StoredData(warehouse).query(bounded_sql(bound))
    fp = fingerprint(table, FEATURES)
    assert {k: mv.labels[k] for k in ("origin", "retrain_job", "trigger", "trigger_ref")} == {
        "origin": "retrain",
        "retrain_job": "ctr.drift.v1",
        "trigger": "drift",
        "trigger_ref": "ctr:v1:1000" if runs[0].ran else "ctr:v1:61000",
    }
    assert mv.labels["stream_seq_bound"] == str(bound) and mv.labels["parent_version"] == "1"
    assert mv.labels["training_fingerprint"] == fp == job.fingerprint
    assert mv.labels["training_labels"] == SPEC
    assert mv.labels["trainer"] == "myelin.trainers:logistic_regression"
    assert mv.labels["trainer_sha256"] == sha256_of(ROOT / "myelin" / "trainers.py")
    assert mv.labels["myelin_version"] == "0.1.0"
    if (ROOT / ".git").is_dir():
        assert len(mv.labels["git_commit"]) == 40
    prov = mv.provenance
    assert prov.feature_views == [f"{VIEW}@{VERSION}"] and prov.features == FEATURES
    assert prov.created_by == "retrain ctr.drift.v1" and prov.training_query == bounded_sql(bound)
    assert prov.label_source == (await reg.get("ctr", 1)).provenance.label_source
    cut = int(table.num_rows * 0.8)
    assert prov.training_rows == cut and job.rows == table.num_rows
    ts = table.column("ts").cast(pa.int64()).to_pylist()
    assert prov.training_window == [min(ts), max(ts)]
    assert mv.reference is not None and mv.reference.features == FEATURES
    assert mv.reference.rows == cut

    # challenger and champion on the same holdout rows, as scikit-learn scores them
    holdout = table.slice(cut)
    auc, logloss, _ = sklearn_holdout(table, cut, holdout)
    champion_auc, champion_logloss, _ = sklearn_holdout(
        champion_table, int(champion_table.num_rows * 0.8), holdout
    )
    m = mv.metrics
    assert m["holdout_rows"] == holdout.num_rows and m["training_rows"] == cut
    assert m["auc"] == pytest.approx(auc, abs=1e-6)
    assert m["logloss"] == pytest.approx(logloss, abs=1e-5)
    assert m["champion_auc"] == pytest.approx(champion_auc, abs=1e-6)
    assert m["champion_logloss"] == pytest.approx(champion_logloss, abs=1e-5)
    assert m["auc"] > 0.6

    # more events arrive (and rows past the bound were there all along): the same bound
    # gives the same rows, byte for byte, and the same fingerprint
    unbounded_before = (await StoredData(warehouse).query(bounded_sql(None))).num_rows
    assert unbounded_before > table.num_rows
    store(warehouse, stream.after(bound))
    later = await StoredData(warehouse).query(bounded_sql(bound))
    assert arrow_to_ipc(later) == arrow_to_ipc(table)
    assert fingerprint(later, FEATURES) == fp
    assert (await StoredData(warehouse).query(bounded_sql(None))).num_rows > unbounded_before

    # a command for the same bound, whose earlier run died mid-way (its heartbeat stopped
    # ten minutes ago): taken over, and it builds the same training set
    dead = RetrainJob(
        job_id=f"ctr.seq.{bound}",
        model="ctr",
        state="running",
        trigger="command",
        owner="elsewhere:1",
        started_ms=1,
        heartbeat_ms=1,
    )
    _, claimed = await (await JobStore.open(js)).claim(dead, stale_ms=1e12, retry_ms=0, force=False)
    assert claimed
    command = await a.run(Trigger("command", "ctr", ref="test", bound=bound))
    assert command.ran and command.job.attempt == 2 and command.job.state == "done"
    assert command.job.fingerprint == fp and command.job.version == 3
    assert (await reg.routes("ctr")).shadow == 3
    assert not (await a.run(Trigger("command", "ctr", ref="test", bound=bound))).ran

    # then shadow -> canary -> champion, each step decided by governance
    with pytest.raises(PromotionDenied, match="only from canary"):
        await reg.set_alias("ctr", "champion", 3, requester="test")
    assert await advance(reg, "ctr", 3, requester="test") == "canary"
    routes = await reg.routes("ctr")
    assert (routes.canary, routes.canary_share, routes.shadow) == (3, 0.1, 0)
    assert await advance(reg, "ctr", 3, requester="test") == "champion"
    assert (await reg.aliases("ctr"))["champion"] == 3 and (await reg.routes("ctr")).canary == 0

    records = await audit_records(js)
    actions = [(r.action, r.subject, r.allow) for r in records]
    assert actions.count(("retrain_start", "ctr.drift.v1", True)) == 2  # and the takeover
    assert actions.count(("retrain_finish", "ctr.drift.v1", True)) == 2
    assert actions.count(("retrain_skip", "ctr.drift.v1", False)) == 2  # the two repeats
    assert ("retrain_finish", f"ctr.seq.{bound}", True) in actions
    promotes = [
        (r.subject, msgspec.json.decode(r.input_json)["alias"], r.allow)
        for r in records
        if r.action == "promote"
    ]
    for step in [("ctr:v2", "shadow", True), ("ctr:v3", "canary", True)]:
        assert step in promotes
    assert ("ctr:v3", "champion", False) in promotes and ("ctr:v3", "champion", True) in promotes


async def test_a_challenger_that_learned_nothing_is_refused_shadow(
    nc: NATS, settings: Settings, warehouse: Warehouse, governance: GovernanceApp
) -> None:
    js = bus.jetstream(nc, settings)
    reg = ModelRegistry(nc, js)
    stream = clickstream(seed=5, impressions=1500)
    bound = stream.events[-1][0] // EVENT_SEQ_STRIDE
    store(warehouse, stream)
    await champion(nc, settings, warehouse, bound)
    lines: list[str] = []
    r = retrainer(
        nc,
        settings,
        warehouse,
        await JobStore.open(js),
        lines,
        trainer=f"{__name__}:shuffled_labels",
    )
    assert r.trainer.source_sha256 == sha256_of(Path(__file__))
    # a drift of a version that is not the champion starts nothing
    other = await r.run(drift_trigger(drift(7, 0)))
    assert not other.ran and "only the champion is retrained" in other.job.reason
    outcome = await r.run(drift_trigger(drift(1, 0)))
    job = outcome.job
    assert outcome.ran and job.state == "denied" and job.version == 2, lines
    assert job.metrics["auc"] < 0.55 and "below the serving floor" in job.reason
    assert (await reg.routes("ctr")).shadow == 0  # registered, with its lineage, not served
    assert (await reg.get("ctr", 2)).labels["trainer"] == f"{__name__}:shuffled_labels"
    assert not (await r.run(drift_trigger(drift(1, 60_000)))).ran  # denied is an outcome
    records = await audit_records(js)
    assert [(x.action, x.allow) for x in records if x.subject == "ctr.drift.v1"] == [
        ("retrain_start", True),
        ("retrain_finish", False),
        ("retrain_skip", False),
    ]
    assert [x.allow for x in records if x.action == "promote" and x.subject == "ctr:v2"] == [False]
    assert next(x.subject for x in records if x.action == "retrain_skip") == "ctr.drift.v7"


async def test_a_job_that_cannot_run_fails_with_an_actionable_reason(
    nc: NATS, settings: Settings, warehouse: Warehouse, governance: GovernanceApp
) -> None:
    js = bus.jetstream(nc, settings)
    stream = clickstream(seed=5, impressions=1500)
    store(warehouse, stream)
    lines: list[str] = []
    r = retrainer(nc, settings, warehouse, await JobStore.open(js), lines)
    nothing = await r.run(Trigger("command", "ctr", ref="test"))
    assert not nothing.ran and "has no champion" in nothing.job.reason
    await champion(nc, settings, warehouse, stream.events[-1][0] // EVENT_SEQ_STRIDE)
    early = await r.run(Trigger("command", "ctr", ref="test", bound=3))  # a handful of events
    assert early.ran and early.job.state == "failed" and not early.job.transient
    assert "MYELIN_RETRAIN_MIN_ROWS" in early.job.reason
    assert not (await r.run(Trigger("command", "ctr", ref="test", bound=3))).ran
    assert (await r.run(Trigger("command", "ctr", ref="test", bound=3), force=True)).ran


async def test_the_schedule_retrains_each_champion_once_per_bound(
    nc: NATS, settings: Settings, warehouse: Warehouse, governance: GovernanceApp
) -> None:
    js = bus.jetstream(nc, settings)
    stream = clickstream(seed=5, impressions=1500)
    store(warehouse, stream)
    await champion(nc, settings, warehouse, stream.events[-1][0] // EVENT_SEQ_STRIDE)
    r = retrainer(nc, settings, warehouse, await JobStore.open(js), [])
    stop = asyncio.Event()
    task = asyncio.create_task(run_schedule(r, ModelRegistry(nc, js), 0.2, stop))
    try:
        for _ in range(100):  # ticks with no new events: the same bound, the same job
            if r.counts.get("existing", 0) >= 2:
                break
            await asyncio.sleep(0.1)
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
    assert r.counts["done"] == 1 and r.counts["existing"] >= 2, r.counts
    jobs = await (await JobStore.open(js)).list("ctr")
    assert [(j.job_id, j.trigger, j.state) for j in jobs] == [
        (f"ctr.seq.{stream.events[-1][0] // EVENT_SEQ_STRIDE}", "schedule", "done")
    ]
