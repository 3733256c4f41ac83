from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from myelin import bus
from myelin.api_tokens import client_headers
from myelin.settings import Settings
from myelin.topology import TERRAFORM_FILE as TOPOLOGY
from tests.helpers import clickstream
from tests.prom_rules import rule_files, rules, selectors

pytestmark = pytest.mark.e2e


def free_port_run(n: int, taken: set[int]) -> int:
    """The first of ``n`` consecutive free ports, none of them in ``taken``."""
    import socket

    from myelin.stack.process import free_port

    while True:
        base = free_port()
        if not {base + k for k in range(n)} & taken:
            try:
                for k in range(n):
                    with socket.socket() as sock:
                        sock.bind(("127.0.0.1", base + k))
                return base
            except OSError:
                continue


def get(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(url, timeout=5) as r:
        text: str = r.read().decode()
    return text


def scrape(port: int) -> str:
    return get(f"http://127.0.0.1:{port}/metrics")


def post_events(settings: Settings, events: list[dict[str, Any]]) -> dict[str, Any]:
    import urllib.request

    req = urllib.request.Request(
        f"http://127.0.0.1:{settings.ingest_http_port}/v1/events",
        data=json.dumps(events).encode(),
        headers={"Content-Type": "application/json", **client_headers(settings)},
    )
    with urllib.request.urlopen(req, timeout=10) as r:
        result: dict[str, Any] = json.loads(r.read())
    return result


def metric_names(text: str) -> set[str]:
    return {m.group(1) for m in re.finditer(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)[{ ]", text, re.M)}


def check_slis(settings: Settings, metrics_base: int) -> None:
    """Traffic through ingest and features, then the SLI series in the real scrapes, and
    every metric the alert rules read among what the seven services export."""
    now = int(time.time() * 1000)
    events = clickstream(20, prefix="sli", now_ms=now, users=5, items=3, ago_ms=10_000, step_ms=100)
    assert post_events(settings, events)["accepted"] == 20
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        features = scrape(metrics_base + 2)
        if "myelin_features_freshness_seconds_count" in features:
            break
        time.sleep(0.2)
    ingest = scrape(metrics_base + 4)
    assert re.search(
        r'^myelin_rpc_duration_seconds_count\{[^}]*rpc="ingest_http"[^}]*\} 1(\.0)?$',
        ingest,
        re.M,
    ), ingest
    assert "myelin_rpc_duration_seconds_bucket{" in ingest and 'le="0.25"' in ingest
    assert re.search(r'^myelin_features_freshness_seconds_bucket\{[^}]*le="1.0"', features, re.M)
    assert re.search(r'^myelin_consumer_lag_messages\{durable="features-', features, re.M)
    assert re.search(r"^myelin_features_version_watermark_delay_s\{", features, re.M)
    assert re.search(
        r'^myelin_consumer_lag_seconds\{durable="warehouse-events"', scrape(metrics_base + 1), re.M
    )
    exported = set().union(*(metric_names(scrape(metrics_base + k)) for k in range(7)))
    for path in rule_files():
        for rule in rules(path):
            for sel in selectors(rule["expr"]):
                if sel.name.startswith("myelin_"):
                    assert sel.name in exported, f"{path.name}: {sel.name} is not exported"


async def check_topology(settings: Settings) -> None:
    """What the running stack created on its nats-server is what infra/terraform declares
    (infra/terraform/topology.json), and nothing else but the features consumers."""
    doc = json.loads(TOPOLOGY.read_text())
    nc = await bus.connect(settings, "test-topology", reconnect=False, identity="admin")
    try:
        js = bus.jetstream(nc, settings)
        infos = await js.streams_info()
        names = {i.config.name or "": i for i in infos}
        plain = {n: sorted(i.config.subjects or []) for n, i in names.items()}
        plain = {n: v for n, v in plain.items() if not n.startswith(("KV_", "OBJ_"))}
        assert plain == {n: sorted(v["subjects"]) for n, v in doc["streams"].items()}
        assert {n.removeprefix("KV_") for n in names if n.startswith("KV_")} == set(
            doc["kv_buckets"]
        )
        assert {n.removeprefix("OBJ_") for n in names if n.startswith("OBJ_")} == set(
            doc["object_stores"]
        )
        for stream in doc["streams"]:
            for c in await js.consumers_info(stream):
                declared = doc["consumers"].get(c.name)
                if declared is None:
                    assert re.fullmatch(r"features-.+-p\d+", c.name), c.name
                    continue
                assert declared["stream"] == stream
                assert (c.config.filter_subject or ">") == declared["filter_subject"]
                assert str(c.config.ack_policy) == declared["ack_policy"]
                assert c.config.max_ack_pending == declared["max_ack_pending"]
                assert c.config.ack_wait == declared["ack_wait_s"]
        present = {c.name for s in doc["streams"] for c in await js.consumers_info(s)}
        assert set(doc["consumers"]) <= present, set(doc["consumers"]) - present
    finally:
        await nc.close()


def sql(url: str, query: str) -> str:
    import urllib.parse
    import urllib.request

    with urllib.request.urlopen(f"{url}?{urllib.parse.urlencode({'query': query})}") as r:
        text: str = r.read().decode()
    return text


def test_up_runs_until_ctrl_c_and_leaves_nothing(settings: Settings) -> None:
    ports = {settings.nats_port, settings.redis_port}
    ports |= {settings.ingest_http_port, settings.inference_grpc_port}
    ports |= {settings.warehouse_http_port, settings.ops_http_port}
    metrics_base = free_port_run(7, ports)  # one Prometheus port per service
    probes_base = free_port_run(7, ports | set(range(metrics_base, metrics_base + 7)))
    env = {
        **os.environ,
        **settings.to_env(),
        "MYELIN_METRICS_PORT": str(metrics_base),
        "MYELIN_HEALTH_HTTP_PORT": str(probes_base),  # /livez /readyz, one port per process
    }
    for k in ("MYELIN_NATS_URL", "MYELIN_REDIS_URL"):  # embedded engines, on the fixture's ports
        env.pop(k, None)
    # Outside the repository, with the default policy dir: the policies ship with the
    # package (on main governance looked for ./policies and failed to start).
    env.pop("MYELIN_POLICY_DIR")
    proc = subprocess.Popen(
        [sys.executable, "-m", "myelin.cli", "up"],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
        cwd=settings.state_dir.parent,
    )
    try:
        assert proc.stderr is not None
        lines: list[str] = []
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            lines.append(line)
            if "Press Ctrl-C" in line or not line:
                break
        assert any("Press Ctrl-C" in ln for ln in lines), "".join(lines)
        children = psutil.Process(proc.pid).children(recursive=True)
        names = sorted(c.name() for c in children)
        assert (
            sum("nats-server" in n for n in names) == 1
            and sum("redis-server" in n for n in names) == 1
        )
        assert len(children) >= 9  # two engines + seven services
        listening = {c.laddr.port for c in psutil.net_connections("tcp") if c.status == "LISTEN"}
        assert settings.ingest_http_port in listening and settings.inference_grpc_port in listening
        # the ClickHouse HTTP interface, at the address `myelin up` printed
        sql_url = f"http://{settings.host}:{settings.warehouse_http_port}/"
        assert any(f"SQL (ClickHouse HTTP): {sql_url}" in ln for ln in lines), lines
        assert sql(sql_url, "SELECT count() FROM myelin.events") == "0\n"
        for c in psutil.net_connections("tcp"):
            if c.status == "LISTEN" and c.laddr.port in (
                settings.ingest_http_port,
                settings.inference_grpc_port,
                settings.warehouse_http_port,
                settings.nats_port,
                settings.redis_port,
            ):
                assert c.laddr.ip in ("127.0.0.1", "::1", "::ffff:127.0.0.1"), (
                    c
                )  # loopback by default
        # governance, warehouse, features, inference, ingest, retrainer get consecutive
        # Prometheus ports
        ingest_metrics = scrape(metrics_base + 4)
        assert "myelin_ingest_accepted_total" in ingest_metrics
        assert "myelin_ingest_in_flight" in ingest_metrics
        features_metrics = scrape(metrics_base + 2)
        assert "myelin_features_late_total" in features_metrics
        assert "myelin_features_position" in features_metrics
        check_slis(settings, metrics_base)
        for i in range(7):  # every process answers its own probe port, ready
            ready = json.loads(get(f"http://127.0.0.1:{probes_base + i}/readyz"))
            assert ready["ready"] is True, ready
        asyncio.run(check_topology(settings))
        # `myelin up` supervises its children: a killed service is started again, and said so
        features = [c for c in children if "services.features" in " ".join(c.cmdline())]
        assert len(features) == 1
        features[0].kill()
        said: list[str] = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            said.append(line)
            if "features ready again" in line or not line:
                break
        assert "features exited with -9 (signal SIGKILL); restarting in" in "".join(said), said
        assert "features ready again" in said[-1], said
        assert "features" in scrape(metrics_base + 2)  # the new process, on the same port
        children = psutil.Process(proc.pid).children(recursive=True)
        proc.send_signal(signal.SIGINT)
        rest = proc.communicate(timeout=60)[1]
        assert proc.returncode == 0, rest
        assert "nothing left running" in rest
        assert not [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
    finally:
        if proc.poll() is None:  # a failed assertion must not leave the stack running
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()


def _survivors(state_dir: Path) -> list[psutil.Process]:
    """Processes whose command line or environment mentions ``state_dir``."""
    found = []
    for p in psutil.process_iter():
        try:
            text = " ".join(p.cmdline()) + " ".join(p.environ().values())
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        if str(state_dir) in text:
            found.append(p)
    return found


def _up_env(settings: Settings) -> dict[str, str]:
    env = {**os.environ, **settings.to_env()}
    for k in ("MYELIN_NATS_URL", "MYELIN_REDIS_URL"):  # embedded engines, on the fixture's ports
        env.pop(k, None)
    return env


@pytest.mark.parametrize(
    ("attr", "what"),
    [
        ("ingest_http_port", "ingest HTTP, MYELIN_INGEST_HTTP_PORT"),
        ("nats_port", "NATS, MYELIN_NATS_PORT"),
    ],
)
def test_up_refuses_a_port_in_use_and_starts_nothing(
    settings: Settings, attr: str, what: str
) -> None:
    import socket

    port = getattr(settings, attr)
    with socket.socket() as held:  # another stack, as far as `myelin up` can tell
        held.bind(("127.0.0.1", port))
        held.listen()
        started = time.monotonic()
        done = subprocess.run(
            [sys.executable, "-m", "myelin.cli", "up"],
            env=_up_env(settings),
            capture_output=True,
            text=True,
            timeout=60,
            cwd=Path(__file__).resolve().parents[2],
        )
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == [
        f"myelin: config_error: port {port} ({what}) is already in use on 127.0.0.1: "
        "is another Myelin stack running? Stop it or choose another port"
    ]
    assert time.monotonic() - started < 30
    assert not _survivors(settings.state_dir)


def test_status_without_nats_is_one_clear_error(settings: Settings) -> None:
    from myelin.stack.process import free_port

    url = f"nats://127.0.0.1:{free_port()}"  # nothing listens there
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "myelin.cli", "status"],
        env={**os.environ, **settings.to_env(), "MYELIN_NATS_URL": url},
        capture_output=True,
        text=True,
        timeout=30,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert time.monotonic() - started < 10
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.splitlines() == [
        f"myelin: nats_unreachable: cannot reach NATS at {url} (connection refused): "
        "is 'myelin up' running? (MYELIN_NATS_URL)"
    ]
    assert done.stdout == ""
