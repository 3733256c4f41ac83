"""The ``myelin`` command line.

myelin up                 run the embedded stack until Ctrl-C
myelin demo [--events N]  the main job, end to end, with a report
myelin status             health of each service
myelin sql "SELECT ..."   read-only SQL on the warehouse
myelin models list NAME   versions and aliases of a model
myelin features views|register|promote|retire|export   feature view versions
myelin features replay|check                           backfill and consistency
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
from typing import Any

import msgspec
from nats.aio.client import Client as NATS

from myelin import bus
from myelin.errors import MyelinError
from myelin.settings import Settings
from myelin.stack.nats_connect import connect_once
from myelin.stack.supervisor import SERVICES, Stack

# the audit trail records the authenticated identity; this only where there is none
REQUESTER_HELP = (
    "who asks, on a server without authentication (otherwise the audit trail names "
    "the credential's identity, e.g. operator)"
)


async def _connect(settings: Settings) -> NATS:
    """The CLI's NATS connection: one clear ``nats_unreachable`` error within seconds when
    nothing answers, instead of nats-py's endless retries and tracebacks."""
    return await connect_once(settings, "cli", hint="is 'myelin up' running? (MYELIN_NATS_URL)")


async def _up(settings: Settings) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    stack = Stack(settings, supervise=True)
    async with stack:
        print(
            f"Myelin is up. Ingest: http://{settings.host}:{settings.ingest_http_port}/v1/events  "
            f"gRPC: {settings.host}:{settings.inference_grpc_port}  NATS: {settings.nats_url}\n"
            + (
                f"SQL (ClickHouse HTTP): http://{settings.host}:{settings.warehouse_http_port}/\n"
                if settings.warehouse_http_port
                else ""
            )
            + (
                f"Ops page: http://{settings.host}:{settings.ops_http_port}/\n"
                if settings.ops_http_port
                else ""
            )
            + "Press Ctrl-C to stop.",
            file=sys.stderr,
            flush=True,
        )
        waits = [asyncio.create_task(stop.wait()), asyncio.create_task(stack.failed.wait())]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()
        if not stack.failed.is_set():
            print("Stopping ...", file=sys.stderr, flush=True)
    if stack.failed.is_set():
        print("myelin: the supervisor gave up; everything is stopped.", file=sys.stderr)
        return 1
    print("Stopped; nothing left running.", file=sys.stderr)
    return 0


async def _demo(settings: Settings, events: int) -> int:
    from myelin.demo.runner import demo_settings, format_report, run_demo

    s = demo_settings(settings)
    report = await run_demo(s, events)
    print(format_report(report))
    print("All services and engines stopped.", file=sys.stderr)
    ok = (
        report.accepted >= events
        and report.predictions > 0
        and report.inference_rows >= report.predictions
        and not report.loop.stopped  # the ML loop got to the end
    )
    return 0 if ok else 1


async def _status(settings: Settings) -> int:
    nc = await _connect(settings)
    code = 0
    workers = {"ingest": settings.ingest_workers, "features": settings.features_workers}
    names = [
        svc if k == 1 else f"{svc}-{k}"
        for svc in SERVICES
        for k in range(1, workers.get(svc, 1) + 1)
    ]
    try:
        for name in names:
            try:
                h = msgspec.json.decode(
                    await bus.request(nc, f"myelin.rpc.health.{name}", {}, timeout=2)
                )
            except MyelinError as exc:
                print(f"{name:<11} DOWN   {exc.message}")
                code = 1
                continue
            # A service answers even when it cannot do its job (a consumer stuck retrying,
            # a model it may not serve): its own "ready" says which.
            if h.get("ready", True):
                failed = h.get("failed_versions") or []
                state = (
                    f"DEGRADED ({len(failed)} failed: {'; '.join(failed)})" if failed else "ready"
                )
                print(f"{name:<11} {state}  {json.dumps(h, default=str)}")
            else:
                reasons = "; ".join(h.get("not_ready") or ["no reason given"])
                print(f"{name:<11} NOT READY ({reasons})  {json.dumps(h, default=str)}")
                code = 1
    finally:
        await nc.close()
    return code


async def _erase(settings: Settings, subject: str, reason: str) -> int:
    """Forget a data subject (asks governance, which destroys the subject's key and has
    the online store and the warehouse delete what they hold)."""
    from myelin.subjects import RPC_GOVERNANCE_ERASE

    nc = await _connect(settings)
    try:
        raw = await bus.request(
            nc, RPC_GOVERNANCE_ERASE, {"subject": subject, "reason": reason}, timeout=600
        )
    finally:
        await nc.close()
    report = msgspec.json.decode(raw)
    print(json.dumps(report, indent=2, sort_keys=True))
    return 0


async def _sql(
    settings: Settings, query: str, max_rows: int, reveal_pii: bool = False, purpose: str = ""
) -> int:
    url = settings.clickhouse_url.get()
    if url and not reveal_pii:
        from myelin.warehouse import ServerWarehouse, read_only_sql

        wh = ServerWarehouse(url)
        try:
            rows: list[dict[str, Any]] = wh.query_arrow(read_only_sql(query)).to_pylist()[:max_rows]
        finally:
            wh.close()
    else:
        from myelin.subjects import RPC_WAREHOUSE_QUERY

        nc = await _connect(settings)
        try:
            req: dict[str, Any] = {"sql": query, "max_rows": max_rows}
            if reveal_pii:
                req |= {"reveal_pii": True, "purpose": purpose}
            raw = await bus.request(nc, RPC_WAREHOUSE_QUERY, req, timeout=60)
        finally:
            await nc.close()
        rows = msgspec.json.decode(raw)["data"]
    for row in rows:
        print(json.dumps(row, default=str))
    return 0


def _read_definition(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, json.JSONDecodeError) as exc:
        raise MyelinError(f"cannot read a feature view definition from {path}: {exc}") from None


async def _views(settings: Settings, args: argparse.Namespace) -> int:
    """Feature view versions: list, register a definition, promote, retire, export."""
    from myelin.subjects import RPC_FEATURES_VIEWS

    cmd = args.features_cmd
    definition = _read_definition(args.file) if cmd == "register" else None
    nc = await _connect(settings)
    try:
        if cmd == "register":
            req: dict[str, Any] = {"op": "register", "definition": definition}
        elif cmd in ("promote", "retire"):
            req = {"op": cmd, "view": args.view, "requester": args.requester}
        else:
            req = {"op": "list"}
        res = msgspec.json.decode(await bus.request(nc, RPC_FEATURES_VIEWS, req, timeout=30))
    finally:
        await nc.close()
    if cmd == "register":
        state = "registered" if res["created"] else "already registered"
        print(
            f"{res['view']}@{res['version']} {state}; "
            + ("served" if res["served"] else "backfilling beside the served version")
        )
        print(
            f"follow it with `myelin features views`, then `myelin features promote {res['view']}@{res['version']}`"
        )
    elif cmd == "promote":
        print(
            f"{res['view']}@{res['version']} is served now (was {res['previous'] or 'none'}; "
            f"decision {res['decision_id'] or '-'})"
        )
    elif cmd == "retire":
        print(f"{res['view']}@{res['version']} retired (its offline rows are kept)")
    elif cmd == "export":
        name, _, version = args.view.partition("@")
        found = [
            v
            for v in res["versions"]
            if v["view"] == name and (v["version"] == version or (not version and v["served"]))
        ]
        if not found:
            print(f"myelin: no feature view version {args.view}", file=sys.stderr)
            return 1
        print(json.dumps(found[0]["definition"], indent=2))
    else:
        print(f"stream last sequence {res['stream_last_seq']:,}")
        for v in res["versions"]:
            print(
                f"{'*' if v['served'] else ' '} {v['view']}@{v['version']}  position {v['position']:,} "
                f"(lag {v['lag_messages']:,})  events {v['events']:,}  late {v['late']:,}  "
                f"features {len(v['features'])}"
            )
        print("(* = served)")
    return 0


def _time_ms(text: str) -> int:
    """ISO 8601 (``2026-11-25T10:00:00Z``) or milliseconds since the epoch; '' is 0."""
    if not text:
        return 0
    if text.isdigit():
        return int(text)
    from datetime import UTC, datetime

    try:
        t = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise MyelinError(f"{text!r} is not a time: use ISO 8601 or epoch milliseconds") from None
    return int((t if t.tzinfo else t.replace(tzinfo=UTC)).timestamp() * 1000)


async def _replay(
    settings: Settings,
    requester: str,
    from_seq: int,
    to_seq: int,
    view: str,
    times: tuple[int, int] = (0, 0),
) -> int:
    """Ask the features service to replay EVENTS into the offline store; show progress."""
    from myelin.demo.progress import Progress
    from myelin.subjects import RPC_FEATURES_REPLAY, health_subject

    nc = await _connect(settings)
    try:
        started = msgspec.json.decode(
            await bus.request(
                nc,
                RPC_FEATURES_REPLAY,
                {
                    "requester": requester,
                    "from_seq": from_seq,
                    "to_seq": to_seq,
                    "view": view,
                    "from_time_ms": times[0],
                    "to_time_ms": times[1],
                },
            )
        )
        print(
            f"replay ({started['mode']}) of stream sequences {started['from_seq']}..{started['to_seq']} "
            f"allowed (decision {started['decision_id']})",
            file=sys.stderr,
        )
        prog = Progress("replay", started["messages_total"], "messages")
        done = 0
        while True:
            await asyncio.sleep(0.2)
            st = msgspec.json.decode(await bus.request(nc, health_subject("features"), {}))[
                "replay"
            ]
            prog.update(st["messages_done"] - done)
            done = st["messages_done"]
            if st["state"] in ("done", "failed"):
                prog.close()
                print(
                    f"replay {st['state']}: {st['events']:,} events"
                    + (f"; {st['error']}" if st["error"] else "")
                )
                return 0 if st["state"] == "done" else 1
    finally:
        await nc.close()


async def _check(settings: Settings, sample: int, view: str) -> int:
    from myelin.subjects import RPC_FEATURES_CHECK

    nc = await _connect(settings)
    try:
        res = msgspec.json.decode(
            await bus.request(nc, RPC_FEATURES_CHECK, {"sample": sample, "view": view}, timeout=120)
        )
    finally:
        await nc.close()
    print(
        f"checked {res['checked']} entities: {res['matched']} match, "
        f"{len(res['mismatches'])} feature mismatches, {res['missing_online']} missing online, "
        f"{res['expired_online']} expired online (values withheld, not compared)"
    )
    for m in res["mismatches"][:50]:
        print(
            f"  {m['entity_id']} {m['feature']}: online {m['online']} offline {m['offline']} (seq {m['seq']})"
        )
    if not res["checked"]:
        # exit 1: a check that compared nothing proves nothing
        why = (
            "no entity of the view's sources is in the warehouse yet"
            if not res["sampled"]
            else "every sampled entity is missing or expired online"
        )
        print(f"nothing was compared: {why}", file=sys.stderr)
        return 1
    return 0 if not res["mismatches"] else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="myelin", description="Myelin real-time decision platform"
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("up", help="run the embedded stack until Ctrl-C")
    d = sub.add_parser("demo", help="run the end-to-end demo on a fresh embedded stack")
    d.add_argument("--events", type=int, default=100_000, help="clickstream events to generate")
    sub.add_parser("status", help="health of each service")
    q = sub.add_parser("sql", help="read-only SQL on the warehouse")
    q.add_argument("query")
    q.add_argument("--max-rows", type=int, default=10_000)
    q.add_argument(
        "--reveal-pii",
        action="store_true",
        help="open personal data tokens in the result, if governance's pii_read allows "
        "(asks, audited; needs --purpose)",
    )
    q.add_argument("--purpose", default="", help="why personal data is read (for --reveal-pii)")
    e = sub.add_parser(
        "erase",
        help="forget a data subject: destroy its PII key, delete its online state and "
        "warehouse rows (asks governance; audited)",
    )
    e.add_argument("subject", help="the entity id (the contracts' key field, e.g. a user_id)")
    e.add_argument("--reason", required=True, help="why (e.g. the data subject's request id)")
    from myelin.contracts import cli as contracts_cli

    contracts_cli.add_parser(sub)
    f = sub.add_parser("features", help="feature pipeline operations")
    fs = f.add_subparsers(dest="features_cmd", required=True)
    rp = fs.add_parser(
        "replay", help="replay EVENTS into the offline store (asks governance first)"
    )
    rp.add_argument("--requester", default="", help=REQUESTER_HELP)
    rp.add_argument(
        "--from-seq",
        type=int,
        default=1,
        help="1 rebuilds feature values too; later: raw history only",
    )
    rp.add_argument("--to-seq", type=int, default=0, help="default: the stream's last sequence")
    rp.add_argument(
        "--from-time",
        default="",
        help="instead of sequences: events that reached the stream from this time (ISO 8601)",
    )
    rp.add_argument("--to-time", default="", help="... until this time (exclusive)")
    ck = fs.add_parser(
        "check", help="online/offline consistency check on sampled entities (exit 1 on mismatch)"
    )
    ck.add_argument("--sample", type=int, default=100)
    for p in (rp, ck):
        p.add_argument("--view", default="", help="NAME@HASH or NAME (default: the served version)")
    fs.add_parser("views", help="feature view versions, their positions and which is served")
    rg = fs.add_parser(
        "register", help="register a feature view definition (JSON); a new version backfills"
    )
    rg.add_argument("file", help="the definition, as `myelin features export` prints it")
    for cmd, text in (
        ("promote", "serve a version (asks governance; it must have caught up)"),
        ("retire", "stop and delete a version that is not served"),
    ):
        pp = fs.add_parser(cmd, help=text)
        pp.add_argument("view", help="NAME@HASH")
        pp.add_argument("--requester", default="", help=REQUESTER_HELP)
    ex = fs.add_parser("export", help="print a version's definition as JSON")
    ex.add_argument("view", help="NAME@HASH or NAME (the served version)")
    from myelin import models_cli

    models_cli.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    from myelin import models_cli
    from myelin.contracts import cli as contracts_cli

    args = build_parser().parse_args(argv)
    try:
        settings = Settings.from_env()
        if args.cmd == "up":
            code = asyncio.run(_up(settings))
        elif args.cmd == "demo":
            code = asyncio.run(_demo(settings, args.events))
        elif args.cmd == "status":
            code = asyncio.run(_status(settings))
        elif args.cmd == "features" and args.features_cmd == "check":
            code = asyncio.run(_check(settings, args.sample, args.view))
        elif args.cmd == "features" and args.features_cmd == "replay":
            times = (_time_ms(args.from_time), _time_ms(args.to_time))
            code = asyncio.run(
                _replay(settings, args.requester, args.from_seq, args.to_seq, args.view, times)
            )
        elif args.cmd == "features":
            code = asyncio.run(_views(settings, args))
        elif args.cmd == "contracts":
            code = asyncio.run(contracts_cli.run(args, settings))
        elif args.cmd == "erase":
            code = asyncio.run(_erase(settings, args.subject, args.reason))
        elif args.cmd == "sql":
            code = asyncio.run(
                _sql(settings, args.query, args.max_rows, args.reveal_pii, args.purpose)
            )
        else:
            code = asyncio.run(models_cli.run(args, settings))
    except MyelinError as exc:
        print(f"myelin: {exc.code}: {exc.message}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        code = 130
    with contextlib.suppress(Exception):
        sys.stdout.flush()
    raise SystemExit(code)


if __name__ == "__main__":
    main()
