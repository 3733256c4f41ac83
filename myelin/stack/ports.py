"""The ports a stack binds: checked free before anything starts, and, once an engine
reports its port open, checked to be held by that engine and not by someone else."""

from __future__ import annotations

import contextlib
import errno
import os
import socket
from dataclasses import dataclass
from pathlib import Path

from myelin.errors import ConfigError


@dataclass(frozen=True, slots=True)
class PortClaim:
    port: int
    host: str
    what: str  # what the port is for, e.g. "ingest HTTP"
    env: str  # the variable that changes it


def _bind_error(claim: PortClaim) -> OSError | None:
    family = socket.AF_INET6 if ":" in claim.host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        # SO_REUSEADDR as the servers themselves set it, so that connections of a stack
        # that just stopped (TIME_WAIT) do not count as "in use"; no SO_REUSEPORT, which
        # would let this bind succeed next to another stack's ingest listener.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((claim.host, claim.port))
        except OSError as exc:
            return exc
    return None


def check_ports_free(claims: list[PortClaim]) -> None:
    """Raise :class:`ConfigError` naming the first port that is configured twice or that
    cannot be bound on its host."""
    seen: dict[int, PortClaim] = {}
    for claim in claims:
        if claim.port == 0:  # the OS picks one
            continue
        other = seen.get(claim.port)
        if other is not None:
            raise ConfigError(
                f"port {claim.port} is configured for both {other.what} ({other.env}) and "
                f"{claim.what} ({claim.env}); give each its own port",
                port=claim.port,
            )
        seen[claim.port] = claim
    for claim in seen.values():
        exc = _bind_error(claim)
        if exc is None:
            continue
        what = f"port {claim.port} ({claim.what}, {claim.env})"
        if exc.errno == errno.EADDRINUSE:
            raise ConfigError(
                f"{what} is already in use on {claim.host}: is another Myelin stack running? "
                "Stop it or choose another port",
                port=claim.port,
            )
        if exc.errno == errno.EACCES:
            raise ConfigError(
                f"{what} needs privileges on {claim.host}; choose a port above 1023",
                port=claim.port,
            )
        raise ConfigError(
            f"cannot bind {what} on {claim.host}: {exc.strerror or exc}; "
            f"check MYELIN_HOST and {claim.env}",
            port=claim.port,
        )


def _listening_inodes(port: int) -> set[int] | None:
    """Inodes of the TCP sockets listening on ``port`` (any address); None without /proc."""
    inodes: set[int] = set()
    readable = False
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        readable = True
        for line in lines:
            f = line.split()
            # local_address is HEXIP:HEXPORT, state 0A is LISTEN, field 9 the inode
            if len(f) > 9 and f[3] == "0A" and int(f[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(int(f[9]))
    return inodes if readable else None


def listens_on(pid: int, port: int) -> bool | None:
    """Whether process ``pid`` holds a listening socket on ``port``; None when this cannot
    be told (no /proc, or the process is not ours to inspect)."""
    inodes = _listening_inodes(port)
    if inodes is None:
        return None
    if not inodes:
        return False
    fd_dir = f"/proc/{pid}/fd"
    try:
        fds = os.listdir(fd_dir)
    except FileNotFoundError:
        return False
    except OSError:
        return None
    for fd in fds:
        with contextlib.suppress(OSError):
            target = os.readlink(f"{fd_dir}/{fd}")
            if target.startswith("socket:[") and int(target[8:-1]) in inodes:
                return True
    return False
