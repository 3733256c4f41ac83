"""Supervision of ``myelin up``'s children: a killed child comes back, a child that crashes
at every start makes the supervisor give up and stop the stack, and readiness only counts
the stack's own processes."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path

import msgspec
import psutil
import pytest
import redis.asyncio as aioredis

from myelin import bus, redis_users
from myelin.errors import ConfigError
from myelin.nats_identity import dev_seed_file
from myelin.settings import Settings
from myelin.stack.engines import NatsServer
from myelin.stack.ports import check_ports_free
from myelin.stack.process import ProcessError
from myelin.stack.supervisor import Stack, StackConflict
from myelin.subjects import health_subject

pytestmark = pytest.mark.e2e
POLICIES = Path(__file__).resolve().parents[2] / "myelin" / "policies"


async def until(check: Callable[[], bool | Awaitable[bool]], timeout: float, what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result = check()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        assert loop.time() < deadline, f"not within {timeout}s: {what}"
        await asyncio.sleep(0.1)


async def health_pid(settings: Settings, name: str) -> int:
    nc = await bus.connect(settings, "test", reconnect=False)
    try:
        pid: int = msgspec.json.decode(await bus.request(nc, health_subject(name), {}))["pid"]
        return pid
    finally:
        await nc.close()


def alive(pid: int | None) -> bool:
    if pid is None or not psutil.pid_exists(pid):
        return False
    return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)


async def test_killed_service_is_restarted_with_a_new_pid(settings: Settings) -> None:
    lines: list[str] = []
    async with Stack(settings, log=lines.append, services=("features",), supervise=True) as stack:
        old = stack.child("features").pid
        assert old is not None and await health_pid(settings, "features") == old
        os.kill(old, signal.SIGKILL)  # from outside, as an OOM killer or an operator would
        await until(lambda: stack.restarts["features"] == 1, 30, "features restarted")
        new = stack.child("features").pid
        assert new not in (None, old)
        assert await health_pid(settings, "features") == new
        assert stack.crashes["features"] == 1 and not stack.failed.is_set()
        log = "\n".join(lines)
        assert "features exited with -9 (signal SIGKILL); restarting in " in log
        assert "(crash 1 of 5 allowed in 300 s); log: " in log
        assert f"features ready again (pid {new})" in log


async def test_killed_engine_comes_back_on_its_port(settings: Settings) -> None:
    lines: list[str] = []
    async with Stack(settings, log=lines.append, services=(), supervise=True) as stack:
        redis = stack.child("redis-server")
        old = redis.pid
        client = aioredis.Redis.from_url(redis_users.client_url(settings, "admin"))
        try:
            await client.set("kept", "yes")  # in the AOF (the kernel's copy) once acked
        finally:
            await client.aclose()
        assert old is not None
        os.kill(old, signal.SIGKILL)
        await until(lambda: stack.restarts["redis-server"] == 1, 30, "redis restarted")
        assert redis.pid != old and redis.running
        client = aioredis.Redis.from_url(redis_users.client_url(settings, "admin"))
        try:
            assert await client.get("kept") == b"yes"  # same data dir, same port
        finally:
            await client.aclose()
        assert f"redis-server ready again (pid {redis.pid})" in "\n".join(lines)


async def test_unsupervised_block_suspends_restarts(settings: Settings) -> None:
    async with Stack(
        settings, log=lambda _m: None, services=("governance",), supervise=True
    ) as stack:
        async with stack.unsupervised("governance") as gov:
            old = gov.pid
            gov.kill()
            await asyncio.sleep(1.5)  # three monitor checks: none restarts it
            assert gov.returncode == -9 and stack.restarts["governance"] == 0
        # left the block: started again and ready
        assert gov.running and gov.pid not in (None, old)
        assert await health_pid(settings, "governance") == gov.pid
        assert stack.restarts["governance"] == 0 and "governance" not in stack.crashes


async def test_restart_service_without_supervision(settings: Settings) -> None:
    """The path the other e2e tests take: no monitor, the test kills or stops and restarts."""
    async with Stack(settings, log=lambda _m: None, services=("governance",)) as stack:
        gov = stack.procs["governance"]
        first = gov.pid
        await gov.stop()
        await stack.restart_service("governance")
        gov.kill()
        await asyncio.sleep(1.0)  # nobody restarts it: this stack is not supervised
        assert gov.returncode == -9 and not stack.crashes
        await stack.restart_service("governance")
        await stack.restart_service("governance", kill=True)
        assert stack.procs["governance"] is gov and gov.running and gov.pid != first
        assert await health_pid(settings, "governance") == gov.pid
        assert stack.restarts["governance"] == 0


async def test_a_child_that_crashes_at_every_start_makes_the_supervisor_give_up(
    settings: Settings, tmp_path: Path
) -> None:
    policies = tmp_path / "policies"
    shutil.copytree(POLICIES, policies)
    s = replace(settings, policy_dir=policies)
    lines: list[str] = []
    stack = Stack(
        s,
        log=lines.append,
        services=("governance",),
        supervise=True,
        max_crashes=2,
        crash_window_s=60,
        backoff_s=0.1,
        max_backoff_s=0.2,
    )
    async with stack:
        pids = [stack.child(n).pid for n in ("nats-server", "redis-server", "governance")]
        for rego in policies.glob("*.rego"):  # from now on governance cannot start
            rego.unlink()
        gov = stack.child("governance")
        assert gov.pid is not None
        os.kill(gov.pid, signal.SIGKILL)
        await asyncio.wait_for(stack.failed.wait(), 60)
        # the stack was stopped in order before `failed` was set
        assert not any(alive(p) for p in pids)
        assert not any(stack.child(n).running for n in ("nats-server", "redis-server"))
    log = "\n".join(lines)
    assert stack.crashes["governance"] == 3 and stack.restarts["governance"] == 0
    assert "governance exited with -9 (signal SIGKILL); restarting in" in log
    assert "governance exited with 1; restarting in" in log
    assert "(crash 2 of 2 allowed in 60 s)" in log
    assert "governance exited with 1, crash 3 within 60 s (at most 2 allowed)" in stack.failure
    assert "giving up and stopping the whole stack" in stack.failure
    assert "no .rego files in" in stack.failure  # the tail of its log says why
    assert stack.failure in log


async def test_another_stack_answering_health_fails_start_up(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with Stack(settings, log=lambda _m: None, services=("governance",)) as first:
        theirs = first.child("governance").pid
        # a second stack on the first one's NATS and Redis: its governance cannot start
        # (no policies), so the only health answer comes from the first stack
        monkeypatch.setenv("MYELIN_NATS_URL", settings.nats_url)
        monkeypatch.setenv("MYELIN_REDIS_URL", settings.redis_url)
        empty = tmp_path / "no-policies"
        empty.mkdir()
        other = replace(
            settings,
            state_dir=tmp_path / "other",
            policy_dir=empty,
            # an operator of the same deployment (its NATS admits only known identities)
            nats_nkey_file=str(dev_seed_file(settings, "admin")),
        )
        second = Stack(other, log=lambda _m: None, services=("governance",))
        with pytest.raises(StackConflict) as err:
            async with second:
                pass
        assert f"answered by pid {theirs}" in err.value.message
        assert "another Myelin stack uses NATS at" in err.value.message
        assert not second.child("governance").running
        assert first.child("governance").running


async def test_engine_on_a_port_another_engine_holds_is_refused(
    settings: Settings, tmp_path: Path
) -> None:
    async with NatsServer(settings.state_dir / "nats", settings.nats_port):
        intruder = NatsServer(tmp_path / "nats2", settings.nats_port)
        with pytest.raises(ProcessError) as err:
            async with intruder:
                pass
        assert "nats-server exited with 1 right after starting" in err.value.message
        assert "address already in use" in err.value.message
        assert not intruder.running


def test_port_check_names_the_port_and_its_variable(settings: Settings) -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", settings.inference_grpc_port))
        held.listen()
        stack = Stack(settings, log=lambda _m: None)
        with pytest.raises(ConfigError) as err:
            check_ports_free(stack.port_claims())
        assert err.value.message == (
            f"port {settings.inference_grpc_port} (inference gRPC, MYELIN_INFERENCE_GRPC_PORT) "
            "is already in use on 127.0.0.1: is another Myelin stack running? "
            "Stop it or choose another port"
        )
    twice = replace(settings, inference_grpc_port=settings.ingest_http_port)
    with pytest.raises(ConfigError, match="configured for both ingest HTTP"):
        check_ports_free(Stack(twice).port_claims())
