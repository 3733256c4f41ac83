"""Inbound adapter: every connection the NATS server refuses (no credential, an unknown
one) is put on the audit trail as ``unauthenticated``, door ``nats``.

The server announces each refusal on ``$SYS.SERVER.<id>.CLIENT.AUTH.ERR`` in its system
account; governance listens there with a credential of that account that may do nothing
else (``myelin.access.AUTH_AUDIT``).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import nats
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from myelin import access, bus
from myelin.audit import platform_record
from myelin.errors import BAD_INPUT, MyelinError
from myelin.records import AuditRecord
from myelin.settings import Settings

log = logging.getLogger(__name__)


class _Client(msgspec.Struct, frozen=True):
    host: str = ""
    port: int = 0
    name: str = ""
    lang: str = ""
    version: str = ""


class _Advisory(msgspec.Struct, frozen=True):
    client: _Client = _Client()
    reason: str = ""


_decode = msgspec.json.Decoder(_Advisory)


def refusal_record(data: bytes) -> AuditRecord:
    """The audit record of one ``CLIENT.AUTH.ERR`` advisory."""
    adv = _decode.decode(data)
    c = adv.client
    who = f"{c.host}:{c.port}" + (f" ({c.name})" if c.name else "")
    return platform_record(
        access.UNAUTHENTICATED_ACTION,
        "nats",
        [f"a NATS connection from {who} was refused: {adv.reason or 'authentication failed'}"],
        {
            "door": "nats",
            "host": c.host,
            "port": c.port,
            "client_name": c.name,
            "client": f"{c.lang} {c.version}".strip(),
            "reason": adv.reason,
        },
    )


async def watch_refused_connections(
    settings: Settings, audit: Callable[[AuditRecord], Awaitable[None]]
) -> NATS | None:
    """Listen for refused connections (``None`` without a system-account credential)."""
    if not settings.nats_auth_audit_nkey_file:
        return None

    async def on_error(exc: Exception) -> None:
        log.warning("nats (auth audit): %s: %s", type(exc).__name__, exc)

    nc = await nats.connect(
        bus.servers(settings),
        nkeys_seed=settings.nats_auth_audit_nkey_file,
        name="myelin-governance-auth-audit",
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.5,
        error_cb=on_error,
    )

    async def on_refusal(msg: Msg) -> None:
        try:
            await audit(refusal_record(msg.data))
        except BAD_INPUT as exc:
            log.warning("an unreadable auth advisory on %s: %s", msg.subject, exc)
        except MyelinError as exc:  # the audit trail is down: said, not retried
            log.warning("a refused NATS connection was not audited: %s", exc.message)

    sub: Any = await nc.subscribe(access.AUTH_ERRORS, cb=on_refusal)
    await nc.flush()
    log.info("auditing refused NATS connections (%s)", sub.subject)
    return nc
