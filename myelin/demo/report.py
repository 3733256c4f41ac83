"""The demo's report: what it measured, and the text it prints."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from myelin.demo.common import ANALYST_SQL, MODEL, VIEW
from myelin.demo.generator import HOT_SHARE, SALE
from myelin.drift import METRICS


@dataclass
class Phase:
    """Live traffic in one phase of the loop."""

    events: int = 0
    predictions: int = 0
    requests: int = 0
    failed: int = 0  # Predict calls that failed (counted, never retried)
    seconds: float = 0.0


@dataclass
class LoopReport:
    normal_events: int = 0
    sale_events: int = 0  # the sale's events ingested in bulk (the rest is live)
    sale_start_ms: int = 0  # event time of its first event
    hot_users: int = 0
    # 1. the replay of the newest normal traffic, and what the monitor made of it
    replay_rows: int = 0
    replay_rounds: int = 0
    replay_s: float = 0.0
    replay_windows: int = 0  # drift windows the replay's scores fell in (1: judged whole)
    before_rows_judged: int = 0
    before_breaches: int = 0
    before_largest: dict[str, tuple[str, float]] = field(default_factory=dict)  # metric -> col
    thresholds: dict[str, float] = field(default_factory=dict)
    # 2. the sale, live
    live: dict[str, Phase] = field(default_factory=dict)  # phase -> traffic
    live_rejected: int = 0
    drift_id: str = ""
    drift_version: int = 0
    drift_window_ms: tuple[int, int] = (0, 0)
    drift_samples: int = 0
    drift_columns: list[dict[str, Any]] = field(default_factory=list)  # breached ones
    drift_after_s: float = 0.0  # from the sale going live
    drift_records: dict[str, int] = field(default_factory=dict)  # version -> windows flagged
    job: dict[str, Any] = field(default_factory=dict)
    retrain_s: float = 0.0  # from the drift to the job's end
    challenger: int = 0
    challenger_metrics: dict[str, float] = field(default_factory=dict)
    challenger_labels: dict[str, str] = field(default_factory=dict)
    challenger_thresholds: dict[str, float] = field(default_factory=dict)  # its drift policy
    sale_rows_in_training: int = 0
    in_shadow: bool = False
    # 3. shadow
    shadow_rows: int = 0
    agreement: dict[str, float] = field(default_factory=dict)
    # 4. backtest and governance
    backtest_period_ms: tuple[int, int] = (0, 0)
    backtest: dict[str, Any] = field(default_factory=dict)
    backtest_text: str = ""
    backtest_error: str = ""
    decision: dict[str, Any] = field(default_factory=dict)
    stopped: str = ""  # why the loop did not get to the end ('' when it did)


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
    predictions: int = 0  # every Predict row the demo asked for (loop and load)
    load_predictions: int = 0  # of which the load measurement's
    predict_requests: int = 0
    predict_p50_ms: float = 0.0
    predict_p99_ms: float = 0.0
    predict_rps: float = 0.0
    batch100_p50_ms: float = 0.0
    batch100_p99_ms: float = 0.0
    oip_max_abs_diff: float = 0.0
    inference_rows: int = 0  # served Predict rows in the ledger (shadow rows left out)
    shadow_rows: int = 0  # and the shadow's
    audit_rows: dict[str, int] = field(default_factory=dict)
    dlq_rows: int = 0
    trace_chain: dict[str, str] = field(default_factory=dict)
    analyst_sql: str = ANALYST_SQL
    analyst_rows: list[dict[str, Any]] = field(default_factory=list)
    events_in_clickhouse: int = 0
    live_accepted: int = 0  # events of the live traffic (on top of the stream's)
    loop: LoopReport = field(default_factory=LoopReport)


def _iso(ms: int) -> str:
    return time.strftime("%H:%M:%S", time.gmtime(ms / 1000)) + f".{ms % 1000:03d}"


def _metric(m: str) -> str:
    return "W1" if m == "wasserstein" else m.upper()


def _loop_lines(r: DemoReport) -> list[str]:
    lp = r.loop
    lines: list[str] = []
    add = lines.append
    th = lp.thresholds
    add("the loop   drift -> retrain -> shadow -> backtest -> governance, on live traffic")
    add(
        f"stream     {lp.normal_events + lp.sale_events:,} events: {lp.normal_events:,} of normal "
        f"traffic, then {lp.sale_events:,} of a flash sale in which {lp.hot_users:,} users "
        f"({HOT_SHARE:.0%}) binge:"
    )
    add(
        f"           {SALE.impressions[0]}-{SALE.impressions[1]} items a session, one every "
        f"~{sum(SALE.gap_ms) / 2000:.1f} s, click propensity x{SALE.lift:g}, no fatigue down "
        f"the list; then the sale went on live: {r.live_accepted:,} more events"
    )
    verdict = (
        "no drift"
        if not lp.before_breaches
        else f"DRIFT in {lp.before_breaches} window{'s' if lp.before_breaches > 1 else ''}"
    )
    add(
        f"before     {lp.replay_rows:,} impressions of the newest normal traffic, each scored just "
        f"before it was shown ({lp.replay_rounds} rounds, {lp.replay_s:.1f} s):"
    )
    span = (
        "all in one window"
        if lp.replay_windows == 1
        else f"across {lp.replay_windows} windows, each judged apart"
    )
    add(
        f"           the drift monitor judged {lp.before_rows_judged:,} of them ({span}): {verdict}"
    )
    add(
        "           largest figures: "
        + ", ".join(f"{_metric(m)} {v:.3f} ({c})" for m, (c, v) in lp.before_largest.items())
    )
    add(
        f"           {MODEL} v{r.model_version}'s thresholds: "
        + ", ".join(f"{_metric(m)} {th.get(m, 0):g}" for m in METRICS)
        + f"; at least {th.get('min_samples', 0):.0f} rows a window"
    )
    live = lp.live
    sale = live.get("sale", Phase())
    if lp.drift_id:
        start, end = lp.drift_window_ms
        add(
            f"drift      {MODEL} v{lp.drift_version} flagged {lp.drift_after_s:.1f} s into the live "
            f"sale (record {lp.drift_id})"
        )
        add(
            f"           window {_iso(start)}-{_iso(end)} UTC, {lp.drift_samples:,} rows; the "
            "columns that breached (* at or over the threshold):"
        )
        for c in lp.drift_columns:
            add(
                f"             {c['feature']:<16}"
                + "".join(
                    f" {_metric(m):>3} {c[m]:6.3f}{'*' if m in c['breached'] else ' '}"
                    for m in METRICS
                )
            )
    else:
        add(f"drift      none flagged in {sale.seconds:.1f} s of live sale")
    job = lp.job
    if not job:
        add("retrain    no retrain job ended")
    else:
        add(
            f"retrain    job {job.get('job_id')} ({job.get('trigger')} {job.get('trigger_ref')}): "
            f"{job.get('state')} {lp.retrain_s:.1f} s after the drift"
            + (f": {job.get('reason')}" if job.get("reason") else "")
        )
    if lp.challenger:
        m, labels = lp.challenger_metrics, lp.challenger_labels
        holdout = int(m.get("holdout_rows", 0))
        rows = int(job.get("rows", 0))
        add(
            f"           challenger {MODEL} v{lp.challenger}: {rows:,} training rows up to EVENTS "
            f"seq {job.get('bound')} ({lp.sale_rows_in_training:,} from the sale), fingerprint "
            f"{str(job.get('fingerprint', ''))[:16]}..."
        )
        add(
            f"           lineage: parent v{labels.get('parent_version')}, origin "
            f"{labels.get('origin')}, labels {labels.get('training_labels')}, "
            f"{labels.get('code_version', '')}"
        )
        newest = "all from the sale" if lp.sale_rows_in_training >= holdout else "newest"
        add(
            f"           on the same holdout ({holdout:,} rows, {newest}): v{lp.challenger} AUC "
            f"{m.get('auc', 0):.3f} logloss {m.get('logloss', 0):.3f}; v{lp.drift_version} AUC "
            f"{m.get('champion_auc', 0):.3f} logloss {m.get('champion_logloss', 0):.3f}"
        )
        if lp.in_shadow:
            shadow, after = live.get("shadow", Phase()), live.get("outcomes", Phase())
            add(
                f"shadow     governance put v{lp.challenger} in shadow: {lp.shadow_rows:,} of its "
                f"scores recorded beside v{lp.drift_version}'s over "
                f"{shadow.seconds + after.seconds:.1f} s of live traffic"
            )
            ag = lp.agreement
            if ag.get("n"):
                add(
                    f"           agreement: {ag['n']:,.0f} pairs, mean |diff| "
                    f"{ag['mean_abs_diff']:.3f}, max {ag['max_abs_diff']:.3f}, decisions flipped "
                    f"at 0.5: {ag['flips']:,.0f} ({ag['flips'] / ag['n']:.1%})"
                )
        else:
            add(f"shadow     governance did not put v{lp.challenger} in shadow")
    if lp.drift_records:
        mine = lp.drift_records.get(str(lp.challenger), 0)
        parts = [f"v{lp.drift_version} in {lp.drift_records.get(str(lp.drift_version), 0)}"]
        if lp.challenger:
            train_rows = int(job.get("rows", 0)) - int(lp.challenger_metrics.get("holdout_rows", 0))
            from_sale = max(
                0, lp.sale_rows_in_training - int(lp.challenger_metrics.get("holdout_rows", 0))
            )
            parts.append(
                f"v{lp.challenger} in {mine} (against its own training rows, "
                f"{train_rows - from_sale:,} of {train_rows:,} from before the sale)"
            )
        add("           windows flagged by the drift monitor: " + "; ".join(parts))
    if lp.backtest_text:
        start, end = lp.backtest_period_ms
        add(
            f"backtest   v{lp.challenger} on the scores v{lp.drift_version} served in its "
            f"{(end - start) / 1000:.1f} s in shadow, against what each user did next:"
        )
        lines.extend("           " + line for line in lp.backtest_text.splitlines())
    elif lp.backtest_error:
        add(f"backtest   {lp.backtest_error}")
    failed = sum(p.failed for p in live.values())
    if failed:
        calls = sum(p.requests for p in live.values())
        add(f"           {failed:,} of {calls:,} live Predict calls failed")
    if lp.stopped:
        add(f"STOPPED    the loop did not finish: {lp.stopped}")
    d = lp.decision
    if d:
        verdict = (
            f"ALLOWED: v{d['version']} is the canary"
            if d.get("allow")
            else f"DENIED: v{d['version']} stays in shadow"
        )
        add(
            f"governance {MODEL} v{d['version']} shadow -> canary ({d['canary_share']:.0%} of the "
            f"traffic): {verdict}"
        )
        for reason in d.get("reasons", []):
            add(f"             - {reason}")
        if d.get("decision_id"):
            add(
                f"           decision {d['decision_id']}, policy version "
                f"{str(d.get('policy_version', ''))[:12]}, audited"
            )
    return lines


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
        f"training   {r.training_rows:,} point-in-time rows from ClickHouse (first half, from its "
        f"second hour); model {MODEL} v{r.model_version}: "
        f"AUC {r.metrics.get('auc', 0):.3f}, logloss {r.metrics.get('logloss', 0):.3f}, "
        f"positive rate {r.metrics.get('positive_rate', 0):.3f}"
    )
    add(f"           ONNX vs scikit-learn max |diff| {r.onnx_vs_sklearn_max_diff:.2e}")
    add(f"governance champion promotion allowed; {r.denied_model} as challenger refused:")
    add(f"           {r.denied_promotion}")
    add(f"           Predict on {r.denied_model.split(' (')[0]} -> {r.denied_status}")
    add("           audit trail: " + ", ".join(f"{k}={v}" for k, v in sorted(r.audit_rows.items())))
    lines.extend(_loop_lines(r))
    add(
        f"inference  {r.load_predictions:,} predictions served in {r.predict_requests:,} single-entity "
        f"requests + 50 x 100-entity requests, after the loop ({r.predictions:,} in all)"
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
    add(
        f"           inference records in ClickHouse: {r.inference_rows:,} served, "
        f"{r.shadow_rows:,} shadow"
    )
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
