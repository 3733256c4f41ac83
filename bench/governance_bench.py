"""Governance decision latency, beside raw regopy, in one run:

1. raw regopy: ``set_input`` + an evaluation of the ``serve`` entry point of the policies
   compiled once into a bundle (the ceiling of an uncached decision), and, for reference,
   an ad-hoc query of the package document (how governance evaluated before: it compiles
   every module again);
2. governance's decision point (``Decider``: cache, evaluation, interpretation) with the
   audit record discarded: uncached (every input new) and cached (one input again);
3. the same with every decision's audit record on a real JetStream (embedded
   nats-server): written behind the decision, as governance runs (``AuditTrail``: the
   record is on the connection ahead of the reply, its acknowledgement awaited behind;
   the CPU figure includes handling the acknowledgements), and, for reference, acked
   before the decision returns (``AuditLog``, one round trip per decision).

Targets (issue 12): p99 < 2 ms uncached and < 0.2 ms cached. CPU us per decision beside.

Run: .venv/bin/python -m bench.governance_bench [--decisions N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from nats.aio.msg import Msg

from bench._common import pct, table
from myelin import bus
from myelin.audit import AuditLog, AuditTrail
from myelin.records import AuditRecord
from myelin.settings import Settings
from myelin.stack.engines import NatsServer
from myelin.stack.process import free_port
from myelin.stack.supervisor import with_ports
from myelin.subjects import AUDIT_STREAM, RPC_GOVERNANCE_DECIDE
from services.governance.decider import Decider
from services.governance.logic import DecisionRequest, policy_version
from services.governance.nats_api import serve_decisions
from services.governance.policy_engines import RegoEngine, load_policies

ROOT = Path(__file__).resolve().parents[1]


def serve_input(i: int) -> dict[str, Any]:
    return {
        "model": {
            "version": i,
            "provenance": {
                "training_window": ["2026-11-01", "2026-11-30"],
                "feature_views": ["v@1"],
            },
            "metrics": {"auc": 0.6 + (i % 100) / 1000},
            "labels": {},
        }
    }


def timed_sync(n: int, fn: Callable[[int], object]) -> tuple[list[float], float]:
    lat: list[float] = []
    cpu0 = time.process_time()
    for i in range(n):
        t0 = time.perf_counter()
        fn(i)
        lat.append((time.perf_counter() - t0) * 1000)
    return lat, (time.process_time() - cpu0) / n * 1e6


async def timed(
    n: int, fn: Callable[[int], Awaitable[object]], between: bool = False
) -> tuple[list[float], float]:
    """Latency of each call and CPU per call. ``between``: the event loop runs once between
    calls, outside the timed part (as a server's does between requests: what was sent is
    written, acknowledgements that came are handled)."""
    lat: list[float] = []
    cpu0 = time.process_time()
    for i in range(n):
        t0 = time.perf_counter()
        await fn(i)
        lat.append((time.perf_counter() - t0) * 1000)
        if between:
            await asyncio.sleep(0)
    return lat, (time.process_time() - cpu0) / n * 1e6


async def timed_flushed(
    n: int, fn: Callable[[int], Awaitable[object]], trail: AuditTrail
) -> tuple[list[float], float]:
    """``timed``, with the CPU figure running until every audit record is acknowledged."""
    cpu0 = time.process_time()
    lat, _ = await timed(n, fn, between=True)
    if not await trail.flush(30.0):
        raise SystemExit(f"{trail.unconfirmed} audit records not stored: {trail.last_error}")
    return lat, (time.process_time() - cpu0) / n * 1e6


def over_nats_rows(
    audit: str,
    measured: tuple[list[float], float],
    echo_lat: list[float],
    echo_cpu: float,
    notes: tuple[str, str, str],
) -> list[tuple[str, str, float, float, str]]:
    """p50, p99 and CPU of cached decisions asked over NATS, beside the bare echo."""
    lat, cpu = measured
    path = f"over NATS, cached, audit {audit}"
    return [
        (path, "p50 ms", pct(lat, 50), pct(echo_lat, 50), notes[0]),
        (path, "p99 ms", pct(lat, 99), pct(echo_lat, 99), notes[1]),
        (path, "us/decision CPU", cpu, echo_cpu, notes[2]),
    ]


async def main(n: int) -> None:
    sources = load_policies(ROOT / "myelin" / "policies")
    from regopy import Interpreter

    raw = Interpreter()
    for name, text in sources.items():
        raw.add_module(name, text)

    bundle = raw.build(None, ["myelin/serve"])

    def bare(i: int) -> object:
        raw.set_input(serve_input(i))
        out = raw.query_bundle_entrypoint(bundle, "myelin/serve")  # kept alive while read
        return json.loads(str(out))

    def adhoc(i: int) -> object:
        raw.set_input(serve_input(i))
        out = raw.query("x := data.myelin.serve")  # kept alive: the binding points into it
        return json.loads(str(out.binding("x")))

    bare(0)
    raw_lat, raw_cpu = timed_sync(n, bare)
    adhoc_lat, adhoc_cpu = timed_sync(max(n // 10, 50), adhoc)

    async def discard(_record: AuditRecord) -> None:
        return None

    engine = RegoEngine(sources, policy_version(sources))
    quiet = Decider(engine, discard, cache_ttl_s=3600)

    def req(i: int) -> DecisionRequest:
        return DecisionRequest("serve", f"ctr:v{i}", serve_input(i))

    await quiet.decide(req(-1))
    unc_lat, unc_cpu = await timed(n, lambda i: quiet.decide(req(i)))
    hot = req(-1)
    hit_lat, hit_cpu = await timed(n, lambda _i: quiet.decide(hot))

    with tempfile.TemporaryDirectory() as tmp:
        s = with_ports(Settings(state_dir=Path(tmp)), nats_port=free_port())
        async with NatsServer(Path(tmp) / "nats", s.nats_port):
            nc = await bus.connect(s, "bench", reconnect=False, identity="admin")
            try:
                js = bus.jetstream(nc, s)
                await bus.provision(js, s)
                acked = Decider(engine, AuditLog(bus.Publisher(js, s)), cache_ttl_s=3600)
                base = 10 * n
                await acked.decide(req(base - 1))
                k_unc_lat, _ = await timed(n, lambda i: acked.decide(req(base + i)))
                hot2 = req(base - 1)
                k_hit_lat, k_hit_cpu = await timed(n, lambda _i: acked.decide(hot2))

                trail = AuditTrail(nc, s)
                await trail.start()
                behind = Decider(engine, trail, cache_ttl_s=3600)
                base = 20 * n
                await behind.decide(req(base - 1))
                a_unc_lat, a_unc_cpu = await timed_flushed(
                    n, lambda i: behind.decide(req(base + i)), trail
                )
                hot3 = req(base - 1)
                a_hit_lat, a_hit_cpu = await timed_flushed(n, lambda _i: behind.decide(hot3), trail)

                # as a caller sees it: request/reply over NATS from a second connection
                # (same process: the CPU figure is both sides and the acknowledgements)
                client = await bus.connect(s, "bench-client", reconnect=False, identity="admin")

                async def echo(msg: Msg) -> None:
                    await msg.respond(b"{}")

                echo_sub = await nc.subscribe("bench.echo", cb=echo)
                await nc.flush()
                await client.request("bench.echo", b"{}", timeout=5)
                echo_lat, echo_cpu = await timed(
                    n, lambda _i: client.request("bench.echo", b"{}", timeout=5)
                )
                await echo_sub.unsubscribe()
                body = {"action": "serve", "subject": hot3.subject, "input": hot3.input}
                rt: dict[str, tuple[list[float], float]] = {}
                for name, decider in (("behind", behind), ("acked", acked)):
                    sub = await serve_decisions(nc, decider)
                    await bus.request(client, RPC_GOVERNANCE_DECIDE, body)
                    rt[name] = await timed(
                        n, lambda _i: bus.request(client, RPC_GOVERNANCE_DECIDE, body)
                    )
                    await sub.unsubscribe()
                await client.close()
                assert await trail.flush(30.0), trail.last_error
                stored = trail.stored
                await trail.close()
                audit_msgs = (await js.stream_info(AUDIT_STREAM)).state.messages
            finally:
                await nc.close()

    rows: list[tuple[str, str, float, float, str]] = [
        (
            "raw regopy, ad-hoc query (governance before)",
            "p50 ms",
            pct(adhoc_lat, 50),
            pct(raw_lat, 50),
            "compiles every module per query",
        ),
        ("raw regopy, ad-hoc query (governance before)", "us/decision CPU", adhoc_cpu, raw_cpu, ""),
        (
            "decision, uncached (audit discarded)",
            "p50 ms",
            pct(unc_lat, 50),
            pct(raw_lat, 50),
            "ceiling: raw regopy set_input + bundle entry point",
        ),
        (
            "decision, uncached (audit discarded)",
            "p99 ms",
            pct(unc_lat, 99),
            pct(raw_lat, 99),
            "target p99 < 2 ms",
        ),
        ("decision, uncached (audit discarded)", "us/decision CPU", unc_cpu, raw_cpu, ""),
        (
            "decision, cached (audit discarded)",
            "p99 ms",
            pct(hit_lat, 99),
            pct(raw_lat, 99),
            "target p99 < 0.2 ms",
        ),
        ("decision, cached (audit discarded)", "us/decision CPU", hit_cpu, raw_cpu, ""),
        (
            "decision, uncached, audit written behind",
            "p99 ms",
            pct(a_unc_lat, 99),
            pct(raw_lat, 99),
            "as governance runs; target p99 < 2 ms",
        ),
        ("decision, uncached, audit written behind", "us/decision CPU", a_unc_cpu, raw_cpu, ""),
        (
            "decision, cached, audit written behind",
            "p50 ms",
            pct(a_hit_lat, 50),
            pct(raw_lat, 50),
            "",
        ),
        (
            "decision, cached, audit written behind",
            "p99 ms",
            pct(a_hit_lat, 99),
            pct(raw_lat, 99),
            "as governance runs; target p99 < 0.2 ms",
        ),
        (
            "decision, cached, audit written behind",
            "us/decision CPU",
            a_hit_cpu,
            raw_cpu,
            "incl. the acknowledgements",
        ),
        (
            "decision, uncached, audit acked before return",
            "p99 ms",
            pct(k_unc_lat, 99),
            pct(raw_lat, 99),
            "reference: one JetStream round trip each",
        ),
        (
            "decision, cached, audit acked before return",
            "p99 ms",
            pct(k_hit_lat, 99),
            pct(raw_lat, 99),
            "reference",
        ),
        ("decision, cached, audit acked before return", "us/decision CPU", k_hit_cpu, raw_cpu, ""),
        *over_nats_rows(
            "written behind",
            rt["behind"],
            echo_lat,
            echo_cpu,
            (
                "ceiling: bare NATS request/reply echo",
                "as a service asks governance",
                "both sides, one process",
            ),
        ),
        *over_nats_rows(
            "acked before return",
            rt["acked"],
            echo_lat,
            echo_cpu,
            ("reference", "reference", ""),
        ),
    ]
    print(table(f"Governance decisions ({n:,} per row, serve policy, one process)", rows))
    print(
        f"audit written behind: {stored:,} records acknowledged; the AUDIT stream holds "
        f"{audit_msgs:,} (acked-before-return rows included)"
    )


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--decisions", type=int, default=3000)
    args = ap.parse_args()
    asyncio.run(main(args.decisions))
