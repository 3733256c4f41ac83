"""``myelin up``: engines, provisioning, the six services, readiness and an ordered stop.

Start order: nats-server, redis-server, provisioning, then governance, warehouse, features,
inference, ingest (intake), retrainer (it only reacts to what the others produce). Stop
order is the reverse: a retrain job in flight stops before the services it reads.

With ``supervise=True`` a monitor checks every child twice a second once the stack is up:
a child that exits is started again after a backoff (:class:`CrashPolicy`), and after too
many crashes the supervisor gives up, stops the whole stack in order and sets ``failed``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path
from types import TracebackType
from typing import Any

import msgspec
import nats.errors
from nats.aio.client import Client as NATS

from myelin import access, api_tokens, bus, dev_tls, nats_identity, redis_users
from myelin.errors import MyelinError
from myelin.settings import Settings
from myelin.stack.crash_policy import CrashPolicy
from myelin.stack.engines import NatsServer, RedisServer
from myelin.stack.nats_connect import connect_once
from myelin.stack.ports import PortClaim, check_ports_free
from myelin.stack.process import ManagedProcess, ProcessError, describe_exit, log_tail
from myelin.subjects import health_subject
from myelin.tasks import cancel_all, cancel_and_wait

SERVICES = ("governance", "warehouse", "features", "inference", "ingest", "retrainer", "ops")
ENGINES = ("nats-server", "redis-server")


class StackConflict(ProcessError):
    """A health check answered by a process this stack did not start."""

    code = "stack_conflict"


class Stack:
    """The whole platform as one async context manager."""

    def __init__(
        self,
        settings: Settings,
        *,
        log: Callable[[str], object] | None = None,
        services: tuple[str, ...] = SERVICES,
        supervise: bool = False,
        max_crashes: int = 5,
        crash_window_s: float = 300.0,
        backoff_s: float = 0.5,
        max_backoff_s: float = 10.0,
        check_interval_s: float = 0.5,
    ) -> None:
        self.settings = settings
        self.services = services
        self._log: Callable[[str], object] = log or (
            lambda msg: print(msg, file=sys.stderr, flush=True)
        )
        self.nats: NatsServer | None = None
        self.redis: RedisServer | None = None
        self.procs: dict[str, ManagedProcess] = {}
        # identity -> its NATS credential, when this stack runs its own NATS (security on)
        self._credentials: dict[str, nats_identity.NatsCredential] = {}
        self._door_env: dict[str, str] = {}  # the HTTP and gRPC doors' TLS and tokens
        self._redis_users = False  # the embedded redis-server has ACL users
        self.metrics: dict[str, int] = {}  # process name -> Prometheus port
        self._metrics_next = 0
        self.supervise = supervise
        self._policy_args = (max_crashes, crash_window_s, backoff_s, max_backoff_s)
        CrashPolicy(*self._policy_args)  # refuse bad limits now, not at the first crash
        self._check_interval_s = check_interval_s
        self.restarts: dict[str, int] = {}  # child -> automatic restarts that came up ready
        self.crashes: dict[str, int] = {}  # child -> exits the monitor saw
        self.failed = asyncio.Event()  # set once the supervisor gave up and stopped the stack
        self.failure = ""  # why it gave up
        self._policies: dict[str, CrashPolicy] = {}
        self._suspended: dict[str, int] = {}  # child -> open unsupervised() blocks
        self._restarting: dict[str, asyncio.Task[None]] = {}
        self._monitor_task: asyncio.Task[None] | None = None
        self._stop_task: asyncio.Future[None] | None = None

    @property
    def stopping(self) -> bool:
        """Whether a stop (asked for, or after giving up) has begun."""
        return self._stop_task is not None

    @property
    def logs_dir(self) -> Path:
        return self.settings.state_dir / "logs"

    def port_claims(self) -> list[PortClaim]:
        """Every port this stack will bind, with what it is for and how to change it."""
        s = self.settings
        claims: list[PortClaim] = []
        if "MYELIN_NATS_URL" not in os.environ:
            claims.append(PortClaim(s.nats_port, "127.0.0.1", "NATS", "MYELIN_NATS_PORT"))
        if "MYELIN_REDIS_URL" not in os.environ:
            claims.append(PortClaim(s.redis_port, "127.0.0.1", "Redis", "MYELIN_REDIS_PORT"))
        if "ingest" in self.services:
            claims.append(
                PortClaim(s.ingest_http_port, s.host, "ingest HTTP", "MYELIN_INGEST_HTTP_PORT")
            )
        if "inference" in self.services:
            claims.append(
                PortClaim(
                    s.inference_grpc_port, s.host, "inference gRPC", "MYELIN_INFERENCE_GRPC_PORT"
                )
            )
        if "warehouse" in self.services and s.warehouse_http_port:
            claims.append(
                PortClaim(
                    s.warehouse_http_port,
                    s.host,
                    "ClickHouse HTTP interface",
                    "MYELIN_WAREHOUSE_HTTP_PORT",
                )
            )
        if "ops" in self.services and s.ops_http_port:
            claims.append(PortClaim(s.ops_http_port, s.host, "ops page", "MYELIN_OPS_HTTP_PORT"))
        names = [n for svc in self.services for n in self._process_names(svc)]
        for base, what, var in (
            (s.metrics_port, "metrics", "MYELIN_METRICS_PORT"),
            (s.health_http_port, "probes", "MYELIN_HEALTH_HTTP_PORT"),
        ):
            if base:
                for k, name in enumerate(names):
                    claims.append(PortClaim(base + k, s.host, f"{name} {what}", var))
        return claims

    def _process_names(self, service: str) -> list[str]:
        s = self.settings
        workers = {"ingest": s.ingest_workers, "features": s.features_workers}.get(service, 1)
        return [service if k == 1 else f"{service}-{k}" for k in range(1, workers + 1)]

    async def start(self) -> None:
        s = self.settings
        check_ports_free(self.port_claims())  # before anything starts: nothing to undo
        s.state_dir.mkdir(parents=True, exist_ok=True)
        if "MYELIN_NATS_URL" not in os.environ:
            # security on: every service and client connects as its own identity, with
            # permissions generated from the topology (myelin.access)
            self._credentials = nats_identity.ensure_dev_seeds(s, list(access.DEV_IDENTITIES))
            self._door_env = _door_security(s)
            keys = {i: c.public_key() for i, c in self._credentials.items()}
            self.nats = NatsServer(
                s.state_dir / "nats",
                s.nats_port,
                "127.0.0.1",
                authorization=access.nats_authorization(keys, s),
            )
            self.nats.start()
            self.restarts["nats-server"] = 0
            await self.nats.wait_ready()
            self._log(f"nats-server   {self.nats.url} (JetStream, data in {s.state_dir / 'nats'})")
        if "MYELIN_REDIS_URL" not in os.environ:
            # security on: the default user is off; features, inference and admin have
            # ACL users of their own (myelin.redis_users)
            self._redis_users = True
            self.redis = RedisServer(
                s.state_dir / "redis",
                s.redis_port,
                "127.0.0.1",
                acl=redis_users.ensure_dev_users(s),
            )
            self.redis.start()
            self.restarts["redis-server"] = 0
            await self.redis.wait_ready()
            self._log(f"redis-server  {self.redis.url} (AOF, data in {s.state_dir / 'redis'})")
        nc = await connect_once(s, "supervisor", identity=access.ADMIN)
        try:
            await bus.provision(bus.jetstream(nc, s), s)
        finally:
            await nc.drain()
        # when set: consecutive ports, one per process, in start order
        self._metrics_next = s.metrics_port
        self._health_next = s.health_http_port
        for service in self.services:
            await self.start_service(service)
        if self.supervise:
            self._monitor_task = asyncio.create_task(self._monitor(), name="stack-monitor")
            self._monitor_task.add_done_callback(self._monitor_done)

    async def start_service(self, service: str) -> None:
        """Start a service's processes (``MYELIN_INGEST_WORKERS`` for ingest,
        ``MYELIN_FEATURES_WORKERS`` for features) and wait for each to report ready."""
        s = self.settings
        env = s.to_env()
        credential = self._credentials.get(service)
        if credential is not None:
            env["MYELIN_NATS_NKEY_FILE"] = str(credential.seed_file)
            env.update(self._door_env)
        if self._redis_users:  # its own Redis user, or none (whatever the shell had set)
            own = service in redis_users.RULES
            env["MYELIN_REDIS_USERNAME"] = service if own else ""
            env["MYELIN_REDIS_PASSWORD_FILE"] = (
                str(redis_users.dev_password_file(s, service)) if own else ""
            )
        auditor = self._credentials.get(access.AUTH_AUDIT)
        if service == "governance" and auditor is not None:
            env["MYELIN_NATS_AUTH_AUDIT_NKEY_FILE"] = str(auditor.seed_file)
        for k, name in enumerate(self._process_names(service), start=1):
            port, probes = self._metrics_next, self._health_next
            proc = ManagedProcess(
                name,
                [sys.executable, "-m", f"services.{service}"],
                self.logs_dir / f"{name}.log",
                {
                    **env,
                    "MYELIN_INSTANCE": str(k),
                    "MYELIN_METRICS_PORT": str(port or 0),
                    "MYELIN_HEALTH_HTTP_PORT": str(probes or 0),
                },
            )
            if port:
                self.metrics[name] = port
                self._metrics_next = port + 1
            if probes:
                self._health_next = probes + 1
            self.procs[name] = proc
            self.restarts[name] = 0
            proc.start()
            await self.wait_ready(name)
            extra = f", metrics :{self.metrics[name]}/metrics" if name in self.metrics else ""
            self._log(f"{name:<13} ready (pid {proc.pid}, log {proc.log_path}{extra})")

    def child(self, name: str) -> ManagedProcess:
        """``nats-server``, ``redis-server`` or a service process (``ingest-2`` for the
        second ingest worker), as this stack started it."""
        found: ManagedProcess | None
        if name == "nats-server":
            found = self.nats
        elif name == "redis-server":
            found = self.redis
        else:
            found = self.procs.get(name)
        if found is None:
            known = ", ".join(n for n, _ in self._children()) or "none yet"
            raise ProcessError(f"this stack has no child {name!r} (children: {known})")
        return found

    def _children(self) -> list[tuple[str, ManagedProcess]]:
        engines: list[tuple[str, ManagedProcess]] = [
            (n, e) for n, e in (("nats-server", self.nats), ("redis-server", self.redis)) if e
        ]
        return engines + list(self.procs.items())

    async def wait_ready(self, name: str, timeout: float = 60.0) -> dict[str, Any]:
        """Wait for the service process ``name`` to answer its health check. Only an
        answer from the process this stack started counts: any other pid is another
        stack on the same NATS, which would otherwise pass for this one."""
        proc = self.procs[name]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        nc: NATS | None = None
        try:
            while True:
                if proc.returncode is not None or proc.pid is None:
                    raise ProcessError(
                        f"{name} exited with {describe_exit(proc.returncode)} while starting:\n"
                        f"{log_tail(proc.log_path)}"
                    )
                try:
                    if nc is None:
                        nc = await connect_once(
                            self.settings, "supervisor-health", timeout=2.0, identity=access.ADMIN
                        )
                    raw = await bus.request(nc, health_subject(name), {}, timeout=1.0)
                    result: dict[str, Any] = msgspec.json.decode(raw)
                except (MyelinError, nats.errors.Error) as exc:
                    if isinstance(exc, nats.errors.Error) and nc is not None:
                        with contextlib.suppress(nats.errors.Error):
                            await nc.close()
                        nc = None  # NATS went away (it may be restarting): connect again
                    if loop.time() > deadline:
                        raise ProcessError(
                            f"{name} not ready after {timeout}s; see {proc.log_path}"
                        ) from None
                    await asyncio.sleep(0.1)
                    continue
                if result.get("pid") != proc.pid:
                    raise StackConflict(
                        f"{name}'s health check was answered by pid {result.get('pid')}, not by "
                        f"the {name} this stack started (pid {proc.pid}): another Myelin stack "
                        f"uses NATS at {self.settings.nats_url}. Stop it, or give this stack its "
                        "own NATS (MYELIN_NATS_URL / MYELIN_NATS_PORT)",
                        pid=result.get("pid"),
                    )
                return result
        finally:
            if nc is not None:
                with contextlib.suppress(nats.errors.Error):
                    await nc.close()

    async def _wait_child_ready(self, name: str) -> None:
        if name in ENGINES:
            engine = self.nats if name == "nats-server" else self.redis
            assert engine is not None
            await engine.wait_ready()
        else:
            await self.wait_ready(name)

    async def restart_service(self, name: str, *, kill: bool = False) -> None:
        """Stop (or SIGKILL) a service process and start it again, waited ready."""
        async with self.unsupervised(name) as proc:
            if kill:
                proc.kill()
            await proc.stop()

    @contextlib.asynccontextmanager
    async def unsupervised(self, name: str) -> AsyncIterator[ManagedProcess]:
        """No automatic restart of child ``name`` while the block runs (the caller may
        kill it, or stop it, and wait); on leaving, a child that is not running is
        started again and waited ready. Blocks may nest (the outermost one restarts)."""
        child = self.child(name)
        self._suspended[name] = self._suspended.get(name, 0) + 1
        try:
            pending = self._restarting.pop(name, None)
            if pending is not None:  # a restart in backoff: the caller takes over
                await cancel_and_wait(pending)  # without taking on its cancellation
            try:
                yield child
            except Exception:
                # leave the stack whole all the same; the caller's error is the one to see
                with contextlib.suppress(MyelinError):
                    await self._resume(name, child)
                raise
            await self._resume(name, child)
        finally:
            self._suspended[name] -= 1
            if not self._suspended[name]:
                del self._suspended[name]

    async def _resume(self, name: str, child: ManagedProcess) -> None:
        if self.stopping or self._suspended[name] > 1:
            return
        if not child.running:
            await child.stop()  # reaps the old process, closes its log
            child.start()
        await self._wait_child_ready(name)

    async def _monitor(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self._check_interval_s)
            if self.stopping:  # a restart task may have given up meanwhile
                return
            for name, child in self._children():
                if name in self._suspended or name in self._restarting:
                    continue
                code = child.returncode
                if code is None:  # running, or stopped on purpose
                    continue
                self.crashes[name] = self.crashes.get(name, 0) + 1
                policy = self._policies.setdefault(name, CrashPolicy(*self._policy_args))
                decision = policy.record(loop.time())
                if decision.give_up:
                    self._give_up(
                        f"{name} exited with {describe_exit(code)}, crash {decision.crash} "
                        f"within {policy.window_s:g} s (at most {policy.max_crashes} allowed): "
                        f"giving up and stopping the whole stack. Last lines of "
                        f"{child.log_path}:\n{log_tail(child.log_path, 20)}"
                    )
                    return
                self._log(
                    f"{name} exited with {describe_exit(code)}; restarting in "
                    f"{decision.delay_s:.1f} s (crash {decision.crash} of {policy.max_crashes} "
                    f"allowed in {policy.window_s:g} s); log: {child.log_path}"
                )
                self._restarting[name] = asyncio.create_task(
                    self._restart(name, decision.delay_s), name=f"restart-{name}"
                )

    async def _restart(self, name: str, delay_s: float) -> None:
        child = self.child(name)
        try:
            await asyncio.sleep(delay_s)
            await child.stop()  # reaps the dead process, closes its log
            child.start()
            await self._wait_child_ready(name)
        except StackConflict as exc:
            self._give_up(f"{exc.message}; giving up and stopping the whole stack")
        except OSError as exc:  # it cannot even be executed any more: no retry will help
            self._give_up(f"cannot start {name} again ({exc}); stopping the whole stack")
        except MyelinError as exc:
            # An exit while starting is the next crash, which the monitor counts; a child
            # that runs but does not answer is only reported.
            if child.running:
                self._log(f"{name} restarted (pid {child.pid}) but not ready: {exc.message}")
        else:
            self.restarts[name] = self.restarts.get(name, 0) + 1
            self._log(f"{name} ready again (pid {child.pid})")
        finally:
            if self._restarting.get(name) is asyncio.current_task():
                del self._restarting[name]

    def _monitor_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:  # nothing watches the children any more: say so, stop it all
            self._give_up(f"the supervisor's monitor failed ({exc!r}); stopping the whole stack")

    def _give_up(self, message: str) -> None:
        if self._stop_task is not None:
            return
        self.failure = message
        bar = "=" * 78
        self._log(f"{bar}\nmyelin supervisor: {message}\n{bar}")
        self._stop_task = asyncio.ensure_future(self._stop_all())
        self._stop_task.add_done_callback(lambda _t: self.failed.set())

    async def stop(self) -> None:
        """Stop everything in order; safe to call twice, and while a stop is under way
        (it then waits for that one)."""
        if self._stop_task is None:
            self._stop_task = asyncio.ensure_future(self._stop_all())
        await asyncio.shield(self._stop_task)

    async def _stop_all(self) -> None:
        # This runs in a task of its own, so it never cancels itself; whatever a watcher
        # ended with has been said already (or does not matter once stopping).
        watchers = [t for t in (self._monitor_task, *self._restarting.values()) if t]
        await cancel_all(watchers)
        self._restarting.clear()
        for name in reversed(list(self.procs)):
            code = await self.procs[name].stop(timeout=30.0)
            if code not in (0, None, -15):
                self._log(
                    f"{name} exited with {describe_exit(code)}; see {self.procs[name].log_path}"
                )
        for engine in (self.redis, self.nats):
            if engine is not None:
                await engine.stop()

    async def __aenter__(self) -> Stack:
        try:
            await self.start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()


def _door_security(s: Settings) -> dict[str, str]:
    """Development TLS and bearer tokens for the HTTP and gRPC doors (kept across
    restarts), as the services' environment; a deployment's own settings win."""
    env: dict[str, str] = {}
    if not s.api_tokens_file:
        env["MYELIN_API_TOKENS_FILE"] = str(api_tokens.ensure_dev_tokens(s))
    if not (s.grpc_tls_cert_file or s.grpc_tls_key_file):
        tls = dev_tls.ensure_dev_tls(s)
        env["MYELIN_GRPC_TLS_CERT_FILE"] = str(tls.cert)
        env["MYELIN_GRPC_TLS_KEY_FILE"] = str(tls.key)
    return env


def with_ports(settings: Settings, **ports: Any) -> Settings:
    """Settings with some ports replaced and URLs that follow them (tests, demo)."""
    s = replace(settings, **ports)
    return replace(
        s,
        nats_url=f"nats://127.0.0.1:{s.nats_port}"
        if "MYELIN_NATS_URL" not in os.environ
        else s.nats_url,
        redis_url=f"redis://127.0.0.1:{s.redis_port}/0"
        if "MYELIN_REDIS_URL" not in os.environ
        else s.redis_url,
    )
