"""``myelin models``: the registry, routes, drift, quality, backtests and retraining.

Every command that changes what serves (``alias``, ``route``) asks governance through the
registry and names who asks (``--requester``, in the audit trail); ``route --rollback``
takes every canary and shadow away in one step. Errors are typed (``code: message`` on
stderr, exit 2).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import msgspec

from myelin import bus
from myelin.drift import Reference, build_reference
from myelin.errors import MyelinError
from myelin.models import ModelRegistry, ModelVersion, Provenance, RegistryError
from myelin.settings import Settings
from myelin.stack.nats_connect import connect_once

# the audit trail records the authenticated identity; this only where there is none
REQUESTER_HELP = (
    "who asks, on a server without authentication (otherwise the audit trail names "
    "the credential's identity, e.g. operator)"
)


class MetaError(MyelinError):
    code = "invalid_model_meta"


class RegisterMeta(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """``--meta META.json`` of ``myelin models register``."""

    name: str
    provenance: Provenance
    metrics: dict[str, float] = {}
    labels: dict[str, str] = {}
    reference: Reference | None = None


async def _registry(settings: Settings) -> tuple[Any, ModelRegistry]:
    nc = await connect_once(settings, "cli", hint="is 'myelin up' running? (MYELIN_NATS_URL)")
    return nc, ModelRegistry(nc, bus.jetstream(nc, settings))


def _ref(text: str) -> tuple[str, str]:
    from myelin.backtest import parse_model_ref

    return parse_model_ref(text)


def load_meta(path: Path) -> RegisterMeta:
    try:
        return msgspec.json.decode(path.read_bytes(), type=RegisterMeta)
    except OSError as exc:
        raise MetaError(f"cannot read {path}: {exc.strerror}") from None
    except msgspec.ValidationError as exc:
        raise MetaError(f"{path}: {exc}") from None
    except msgspec.DecodeError as exc:
        raise MetaError(f"{path} is not JSON: {exc}") from None


def reference_from_training(onnx: bytes, features: list[str], path: Path) -> Reference:
    """Drift reference bins from a training set (Parquet, one column per feature), scored by
    the model itself, as it will be served."""
    import numpy as np
    import onnxruntime as ort
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (OSError, ValueError) as exc:
        raise MetaError(f"cannot read the training set {path}: {exc}") from None
    missing = [f for f in features if f not in table.column_names]
    if missing:
        raise MetaError(f"the training set {path} lacks the model's feature(s) {missing}")
    x = np.column_stack(
        [
            np.nan_to_num(table.column(f).to_numpy(zero_copy_only=False).astype(np.float64))
            for f in features
        ]
    ).astype(np.float32)
    sess = ort.InferenceSession(onnx, providers=["CPUExecutionProvider"])
    outputs = sess.run(None, {sess.get_inputs()[0].name: x})
    probs = np.asarray(outputs[-1], dtype=np.float64)
    scores = probs[:, 1] if probs.ndim == 2 and probs.shape[1] >= 2 else probs.reshape(-1)
    return build_reference(features, x, scores)


async def cmd_register(args: argparse.Namespace, settings: Settings) -> int:
    import onnxruntime as ort

    from myelin.onnx_signature import signature

    path = Path(args.model)
    try:
        onnx = await asyncio.to_thread(path.read_bytes)
    except OSError as exc:
        raise MetaError(f"cannot read {path}: {exc.strerror}") from None
    meta = load_meta(Path(args.meta))
    try:
        inputs, outputs = signature(ort.InferenceSession(onnx, providers=["CPUExecutionProvider"]))
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises plain errors on bad models
        raise MetaError(f"{path} is not a model onnxruntime can load: {exc}") from None
    reference = meta.reference
    if args.training:
        reference = reference_from_training(
            onnx, list(meta.provenance.features), Path(args.training)
        )
    nc, reg = await _registry(settings)
    try:
        mv = await reg.register(
            meta.name,
            onnx,
            inputs=inputs,
            outputs=outputs,
            provenance=meta.provenance,
            metrics=meta.metrics,
            labels=meta.labels,
            reference=reference,
        )
    finally:
        await nc.close()
    drift = (
        f", drift reference over {reference.rows:,} rows" if reference else ", no drift reference"
    )
    print(f"registered {mv.name} v{mv.version} ({mv.size:,} bytes, sha256 {mv.sha256[:12]}{drift})")
    return 0


async def cmd_list(args: argparse.Namespace, settings: Settings) -> int:
    nc, reg = await _registry(settings)
    try:
        aliases = await reg.aliases(args.name)
        routes = await reg.routes(args.name)
        versions = await reg.versions(args.name)
        if not versions:
            raise RegistryError(f"no model {args.name!r} in the registry")
        for v in versions:
            mv = await reg.get(args.name, v)
            tags = [a for a, t in aliases.items() if t == v]
            if routes.canary == v:
                tags.append(f"canary {routes.canary_share:.0%}")
            if routes.shadow == v:
                tags.append("shadow")
            print(
                f"{args.name} v{v} {','.join(tags) or '-'} "
                f"auc={mv.metrics.get('auc', float('nan')):.3f} "
                f"view={mv.provenance.feature_view} rows={mv.provenance.training_rows} "
                f"drift={'yes' if mv.reference else 'no'}"
                + (f" origin={mv.labels['origin']}" if "origin" in mv.labels else "")
            )
    finally:
        await nc.close()
    return 0


def describe(mv: ModelVersion, full: bool) -> dict[str, Any]:
    doc: dict[str, Any] = msgspec.to_builtins(mv)
    if mv.reference is not None and not full:
        doc["reference"] = {
            "rows": mv.reference.rows,
            "policy": msgspec.to_builtins(mv.reference.policy),
            "bins": {
                c: len(b.counts)
                for c, b in zip(mv.reference.columns, mv.reference.bins, strict=True)
            },
        }
    return doc


async def cmd_show(args: argparse.Namespace, settings: Settings) -> int:
    name, ref = _ref(args.ref)
    nc, reg = await _registry(settings)
    try:
        mv = await reg.resolve(name, ref)
    finally:
        await nc.close()
    print(json.dumps(describe(mv, args.full), indent=2, sort_keys=True))
    return 0


async def cmd_alias(args: argparse.Namespace, settings: Settings) -> int:
    nc, reg = await _registry(settings)
    try:
        await reg.set_alias(args.name, args.alias, args.version, requester=args.requester)
    finally:
        await nc.close()
    print(f"{args.name}:{args.alias} -> v{args.version} (governance allowed)")
    return 0


async def cmd_route(args: argparse.Namespace, settings: Settings) -> int:
    nc, reg = await _registry(settings)
    try:
        if args.rollback:
            previous = await reg.rollback(args.name, requester=args.requester)
            print(
                f"{args.name}: routes cleared (were canary v{previous.canary} "
                f"{previous.canary_share:.0%}, shadow v{previous.shadow}); the champion serves "
                "everything"
            )
            return 0
        if args.canary is None and args.share is None and args.shadow is None:
            r = await reg.routes(args.name)
        else:
            r = await reg.set_routes(
                args.name,
                canary=args.canary,
                canary_share=args.share,
                shadow=args.shadow,
                requester=args.requester,
            )
    finally:
        await nc.close()
    print(
        f"{args.name}: canary "
        + (f"v{r.canary} ({r.canary_share:.0%} of entities)" if r.canary else "none")
        + ", shadow "
        + (f"v{r.shadow}" if r.shadow else "none")
    )
    return 0


async def cmd_drift(args: argparse.Namespace, settings: Settings) -> int:
    from myelin.models import check_name
    from myelin.sql_client import query
    from myelin.subjects import health_subject

    check_name(args.name)
    nc, _ = await _registry(settings)
    try:
        try:
            health = msgspec.json.decode(
                await bus.request(nc, health_subject("inference"), {}, timeout=2)
            )
        except MyelinError as exc:
            health = {}
            print(
                f"inference did not answer ({exc.message}): live figures unknown", file=sys.stderr
            )
        prefix = f"{args.name}:v"
        live = {k: v for k, v in health.get("drift_score", {}).items() if k.startswith(prefix)}
        pending = {
            k: v for k, v in health.get("drift_pending_rows", {}).items() if k.startswith(prefix)
        }
        # Arrow, not JSON rows: the times come back as datetimes (JSON gives strings)
        rows = (
            await query(
                nc,
                f"""SELECT drift_id, window_end, model_version, samples, feature, psi, js,
                       wasserstein, ks, breached
                FROM myelin.drift_events FINAL
                WHERE model = '{args.name}' AND length(breached) > 0
                  AND window_end >= now64(3) - INTERVAL {int(args.hours)} HOUR
                ORDER BY window_end, model_version, feature""",
            )
        ).to_pylist()
    finally:
        await nc.close()
    print(f"latest judged window (rows not judged yet: {pending or 'none'}):")
    figures: dict[tuple[str, str], dict[str, float]] = {}
    for key, value in live.items():
        label, feature, figure = key.rsplit(":", 2)
        figures.setdefault((label, feature), {})[figure] = value
    print(f"  {'version':<9} {'feature':<22} {'psi':>7} {'js':>6} {'w1':>6} {'ks':>6}")
    for (label, feature), f in sorted(figures.items()):
        print(
            f"  {label.split(':')[1]:<9} {feature:<22} {f.get('psi', 0):>7.3f} "
            f"{f.get('js', 0):>6.3f} {f.get('wasserstein', 0):>6.3f} {f.get('ks', 0):>6.3f}"
        )
    print(f"DriftDetected in the last {args.hours} h: {len({r['drift_id'] for r in rows})}")
    for r in rows:
        print(
            f"  {r['window_end']:%Y-%m-%d %H:%M:%S} v{r['model_version']} {r['feature']:<22} "
            f"n={r['samples']:<6} psi={r['psi']:.3f} js={r['js']:.3f} "
            f"w1={r['wasserstein']:.3f} ks={r['ks']:.3f} breached={','.join(r['breached'])}"
        )
    return 0


async def cmd_quality(args: argparse.Namespace, settings: Settings) -> int:
    from myelin.quality import quality_sql
    from myelin.sql_client import query

    feature, _, width = args.cohort.partition(":")
    try:
        width_f = float(width) if width else 1.0
    except ValueError:
        raise MyelinError(
            f"--cohort {args.cohort!r}: use FEATURE:WIDTH, e.g. clicks_1h:2"
        ) from None
    nc, reg = await _registry(settings)
    try:
        versions = await reg.versions(args.name)
        if not versions:
            raise RegistryError(f"no model {args.name!r}; see `myelin models list NAME`")
        source = (await reg.get(args.name, versions[-1])).provenance.label_source
        if source is None:
            raise RegistryError(
                f"model {args.name} v{versions[-1]} names no label source "
                "(provenance.label_source): its outcomes cannot be joined"
            )
        try:
            sql = quality_sql(args.name, source, cohort_feature=feature, cohort_width=width_f)
        except ValueError as exc:
            raise MyelinError(str(exc)) from None
        rows = (await query(nc, sql, timeout=120)).to_pylist()
    finally:
        await nc.close()
    print(
        f"{'version':>7} {'hour':<17} {'cohort':>7} {'n':>7} {'pos':>6} {'auc':>6} "
        f"{'logloss':>8} {'mean':>6} {'rate':>6} {'ece':>6}"
    )
    for r in rows:
        print(
            f"{r['model_version']:>7} {r['hour']:%Y-%m-%d %H:%M} {r['cohort']:>7g} {r['n']:>7,} "
            f"{r['positives']:>6,} {r['auc']:>6.3f} {r['logloss']:>8.4f} {r['mean_score']:>6.3f} "
            f"{r['positive_rate']:>6.3f} {r['ece']:>6.3f}"
        )
    if not rows:
        print("no judged inferences yet (outcomes arrive after the label window)", file=sys.stderr)
    return 0


async def cmd_agreement(args: argparse.Namespace, settings: Settings) -> int:
    from myelin.quality import agreement_sql
    from myelin.sql_client import query

    try:
        sql = agreement_sql(args.name, threshold=args.threshold, hours=args.hours)
    except ValueError as exc:
        raise MyelinError(str(exc)) from None
    nc, _ = await _registry(settings)
    try:
        rows = (await query(nc, sql)).to_pylist()  # datetimes, as the format below wants
    finally:
        await nc.close()
    print(
        f"{'served':>6} {'shadow':>6} {'hour':<17} {'n':>7} {'mean|d|':>8} {'max|d|':>7} "
        f"{'corr':>6} {'flips':>6}"
    )
    for r in rows:
        print(
            f"{'v' + r['served_version']:>6} {'v' + r['shadow_version']:>6} "
            f"{r['hour']:%Y-%m-%d %H:%M} {r['n']:>7,} {r['mean_abs_diff']:>8.4f} "
            f"{r['max_abs_diff']:>7.4f} {r['correlation']:>6.3f} {r['flips']:>6,}"
        )
    if not rows:
        print(f"no shadow scores of {args.name} in the last {args.hours} h", file=sys.stderr)
    return 0


async def cmd_advance(args: argparse.Namespace, settings: Settings) -> int:
    from myelin.retraining import advance

    nc, reg = await _registry(settings)
    try:
        stage = await advance(
            reg, args.name, args.version, requester=args.requester, canary_share=args.share
        )
    finally:
        await nc.close()
    print(f"{args.name} v{args.version} is now the {stage} (governance allowed)")
    return 0


async def cmd_retrains(args: argparse.Namespace, settings: Settings) -> int:
    from myelin.retraining import list_jobs

    nc, _ = await _registry(settings)
    try:
        jobs = await list_jobs(nc, settings, args.name)
    finally:
        await nc.close()
    for j in jobs:
        doc = msgspec.to_builtins(j)
        print(json.dumps(doc, sort_keys=True))
    if not jobs:
        print("no retrain jobs", file=sys.stderr)
    return 0


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    m = sub.add_parser("models", help="model registry, routes, drift, quality, backtest, retrain")
    ms = m.add_subparsers(dest="models_cmd", required=True)
    rg = ms.add_parser("register", help="register an ONNX model with its metadata")
    rg.add_argument("model", help="MODEL.onnx")
    rg.add_argument(
        "--meta",
        required=True,
        help="META.json: {name, provenance: {features, feature_view, feature_views, "
        "training_window, label_source, ...}, metrics, labels}",
    )
    rg.add_argument(
        "--training",
        default="",
        help="the training set (Parquet, a column per feature): freezes the drift reference",
    )
    ls = ms.add_parser("list", help="versions, aliases and routes of a model")
    ls.add_argument("name")
    sh = ms.add_parser("show", help="one version as JSON (provenance, metrics, lineage)")
    sh.add_argument("ref", help="NAME@VERSION or NAME@ALIAS")
    sh.add_argument("--full", action="store_true", help="include every drift reference bin")
    al = ms.add_parser("alias", help="point an alias at a version (asks governance)")
    al.add_argument("name")
    al.add_argument("alias", help="champion, challenger or shadow")
    al.add_argument("version", type=int)
    rt = ms.add_parser(
        "route", help="show or move the canary / shadow (asks governance); --rollback clears"
    )
    rt.add_argument("name")
    rt.add_argument("--canary", type=int, help="version taking a share of entities (0: none)")
    rt.add_argument("--share", type=float, help="the canary's share of entities, e.g. 0.1")
    rt.add_argument("--shadow", type=int, help="version scored beside the champion (0: none)")
    rt.add_argument("--rollback", action="store_true", help="clear every route at once")
    for p in (al, rt):
        p.add_argument("--requester", default="", help=REQUESTER_HELP)
    dr = ms.add_parser("drift", help="drift figures of the served versions and recent breaches")
    dr.add_argument("name")
    dr.add_argument("--hours", type=int, default=24)
    q = ms.add_parser("quality", help="quality per version and hour (and cohort), labels joined")
    q.add_argument("name")
    q.add_argument(
        "--cohort", default="", help="per cohort: FEATURE:WIDTH buckets of a served feature value"
    )
    ag = ms.add_parser("agreement", help="shadow vs the version that served, per hour")
    ag.add_argument("name")
    ag.add_argument("--threshold", type=float, default=0.5, help="the decision threshold")
    ag.add_argument("--hours", type=int, default=24)
    bt = ms.add_parser(
        "backtest", help="score a version on the ledger's features-as-served for a period"
    )
    bt.add_argument("ref", help="NAME@VERSION (or NAME@ALIAS)")
    bt.add_argument("--from", dest="t_from", required=True, help="ISO 8601, -2h, now-1d, ...")
    bt.add_argument("--to", dest="t_to", default="now")
    re_ = ms.add_parser("retrain", help="retrain a model now (reproducible, governed)")
    re_.add_argument("name")
    re_.add_argument(
        "--bound",
        type=int,
        default=None,
        help="EVENTS stream sequence to train up to (default: now)",
    )
    re_.add_argument("--force", action="store_true", help="train again for the same bound")
    re_.add_argument("--requester", default="cli", help=REQUESTER_HELP)
    adv = ms.add_parser(
        "advance", help="ask governance for a version's next stage: shadow -> canary -> champion"
    )
    adv.add_argument("name")
    adv.add_argument("version", type=int)
    adv.add_argument("--share", type=float, default=0.1, help="the canary's share of entities")
    adv.add_argument("--requester", default="", help=REQUESTER_HELP)
    jobs = ms.add_parser("retrains", help="retrain jobs (their trigger, state, version, reason)")
    jobs.add_argument("name", nargs="?", default="")


async def run(args: argparse.Namespace, settings: Settings) -> int:
    cmd = args.models_cmd
    if cmd == "backtest":
        from myelin.backtest import backtest_command

        return await backtest_command(settings, args.ref, args.t_from, args.t_to)
    if cmd == "retrain":
        from myelin.retraining import retrain_command

        return await retrain_command(
            settings, args.name, bound=args.bound, force=args.force, requester=args.requester
        )
    handlers = {
        "register": cmd_register,
        "list": cmd_list,
        "show": cmd_show,
        "alias": cmd_alias,
        "route": cmd_route,
        "drift": cmd_drift,
        "quality": cmd_quality,
        "agreement": cmd_agreement,
        "advance": cmd_advance,
        "retrains": cmd_retrains,
    }
    return await handlers[cmd](args, settings)
