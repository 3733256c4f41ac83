"""One bounded attempt to connect to NATS, for the command line and the supervisor.

``bus.connect(..., reconnect=False)`` does not bound the first connection: nats-py
retries a refused server forever when ``max_reconnect_attempts`` is 0 and reports each
failure through its default error callback, which logs a traceback. Short-lived clients
want one clear error instead.
"""

from __future__ import annotations

import asyncio
import logging

import nats
import nats.errors
from nats.aio.client import Client as NATS

from myelin.bus import auth_options, remember_identity, servers
from myelin.errors import MyelinError
from myelin.settings import Settings

log = logging.getLogger(__name__)


class NatsUnreachable(MyelinError):
    code = "nats_unreachable"


def _reason(exc: BaseException | None) -> str:
    if exc is None or isinstance(exc, TimeoutError):
        return "connection timed out"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, OSError):
        return exc.strerror or str(exc) or type(exc).__name__
    return str(exc) or type(exc).__name__


async def connect_once(
    settings: Settings,
    name: str,
    *,
    timeout: float = 5.0,
    hint: str = "",
    identity: str | None = None,
) -> NATS:
    """A connection without reconnects, or :class:`NatsUnreachable` within ``timeout``
    seconds; nothing is logged on the way (later client errors go to debug). It connects
    as ``identity`` when its development credential exists, else as the process's own
    (:mod:`myelin.nats_identity`)."""
    who, auth = auth_options(settings, identity)
    last: BaseException | None = None

    async def on_error(exc: Exception) -> None:
        nonlocal last
        last = exc
        log.debug("nats client %s: %r", name, exc)

    try:
        nc = await asyncio.wait_for(
            nats.connect(
                servers(settings),
                **auth,
                name=f"myelin-{name}",
                allow_reconnect=False,
                # one retry of the server list, then NoServersError (0 would mean forever)
                max_reconnect_attempts=1,
                reconnect_time_wait=0.25,
                connect_timeout=max(1, int(timeout / 2)),
                error_cb=on_error,
            ),
            timeout,
        )
    except (OSError, TimeoutError, nats.errors.Error) as exc:
        cause = last if last is not None else exc
        raise NatsUnreachable(
            f"cannot reach NATS at {settings.nats_url} ({_reason(cause)})"
            + (f": {hint}" if hint else ""),
            url=settings.nats_url,
        ) from None
    return remember_identity(nc, who)
