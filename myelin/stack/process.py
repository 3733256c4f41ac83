"""A child process as an async context manager with an idempotent, ordered stop."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path
from types import TracebackType
from typing import IO

from myelin.errors import MyelinError


class ProcessError(MyelinError):
    code = "process_error"


# Runs as its own small program (not between fork and exec: Python code there, in a process
# whose other threads hold locks, e.g. gRPC's, can crash the child before it runs anything;
# seen as SIGSEGV in the fault harness). PR_SET_PDEATHSIG survives the exec that follows.
_PDEATHSIG_EXEC = (
    "import ctypes, os, signal, sys; "
    "ctypes.CDLL('libc.so.6').prctl(1, signal.SIGTERM); "
    "os.execvp(sys.argv[1], sys.argv[1:])"
)


def dying_with_parent(argv: list[str]) -> list[str]:
    """``argv`` run so that the kernel stops it (SIGTERM) when the supervisor dies:
    through util-linux's ``setpriv --pdeathsig``, or a two-line Python exec wrapper."""
    setpriv = shutil.which("setpriv")
    if setpriv:
        return [setpriv, "--pdeathsig", "TERM", "--", *argv]
    return [sys.executable, "-c", _PDEATHSIG_EXEC, *argv]


def describe_exit(code: int | None) -> str:
    """``-9 (signal SIGKILL)`` for a killed process, the plain exit status otherwise."""
    if code is None:
        return "no exit status"
    if code < 0:
        try:
            return f"{code} (signal {signal.Signals(-code).name})"
        except ValueError:
            return f"{code} (signal {-code})"
    return str(code)


def log_tail(path: Path, lines: int = 30) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return ""


def _ephemeral_range() -> tuple[int, int]:
    with contextlib.suppress(OSError, ValueError):
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    return 32768, 60999


def free_port(host: str = "127.0.0.1", bus_offset: int = 0) -> int:
    """A port nothing listens on, chosen *below* the kernel's ephemeral range: a port from
    ``bind(0)`` can be handed out again moments later as the local end of some outgoing
    connection, and then the service meant to listen on it cannot (seen in the test suite
    as "address already in use"). With ``bus_offset``, ``port + bus_offset`` is free and
    below that range too (a Redis Cluster node takes its cluster bus there)."""
    low, _ = _ephemeral_range()
    if low - bus_offset > 11_000:
        for _ in range(100):
            port = random.randrange(10_000, low - bus_offset)
            wanted = {port, port + bus_offset}
            if wanted & _GIVEN:  # not twice from one process: the first may not listen yet
                continue
            if all(_bindable(host, p) for p in wanted):
                _GIVEN.update(wanted)
                return port
    if bus_offset:
        raise ProcessError(f"no free pair of ports {bus_offset} apart below {low}")
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _bindable(host: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


_GIVEN: set[int] = set()


async def wait_port(
    host: str, port: int, timeout: float, proc: ManagedProcess | None = None
) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        if proc is not None and proc.returncode is not None:
            raise ProcessError(
                f"{proc.name} exited with {describe_exit(proc.returncode)}; last lines of "
                f"{proc.log_path}:\n{log_tail(proc.log_path, 10)}"
            )
        try:
            _, writer = await asyncio.open_connection(host, port)
            writer.close()
            await writer.wait_closed()
            return
        except OSError:
            if loop.time() > deadline:
                raise ProcessError(f"nothing listens on {host}:{port} after {timeout}s") from None
            await asyncio.sleep(0.05)


class ManagedProcess:
    """Starts ``argv`` with its output in ``log_path``; ``stop`` is safe to call twice, and
    a stopped process can be started again."""

    def __init__(
        self, name: str, argv: list[str], log_path: Path, env: dict[str, str] | None = None
    ) -> None:
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self.env = env
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def returncode(self) -> int | None:
        """The exit status once the started process has exited; None while it runs and
        when it is not started (or was stopped on purpose)."""
        return self._proc.poll() if self._proc else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        if self._proc is not None:
            return
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        env = {**os.environ, **(self.env or {})}
        try:
            self._proc = subprocess.Popen(
                dying_with_parent(self.argv),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,  # Ctrl-C reaches the supervisor, which stops us in order
            )
        except BaseException:
            log.close()
            raise
        self._log = log

    async def stop(self, timeout: float = 10.0) -> int | None:
        proc = self._proc
        if proc is None:
            return None
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout
            while proc.poll() is None and loop.time() < deadline:  # noqa: ASYNC110 - polling a child
                await asyncio.sleep(0.05)
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await asyncio.to_thread(proc.wait)
        if self._log is not None:
            self._log.close()
            self._log = None
        self._proc = None  # it can be started again
        return proc.returncode

    def kill(self) -> None:
        """SIGKILL, for crash tests."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()

    async def __aenter__(self) -> ManagedProcess:
        self.start()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()
