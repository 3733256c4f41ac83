"""Redis ACL users: the online store is readable and writable only by who needs it.

``myelin up`` runs its redis-server with the ``default`` user off and one ACL user per
identity that needs Redis, each with a password of its own under
``.myelin/security/redis/<identity>.pass`` (0600; redis.conf holds only their SHA-256):

- ``features`` writes the online store: every data command, no administration (but
  ``BGREWRITEAOF``, which an erasure needs to drop the subject from the append-only file);
- ``inference`` reads it: read commands only (and PING, HELLO, AUTH, ECHO, SELECT);
- ``admin`` (the operator's tools and tests) may do anything.

Every other identity (ingest, governance, the warehouse, producers, ...) has no Redis
credential at all. A deployment's own Redis sets ``MYELIN_REDIS_USERNAME`` and
``MYELIN_REDIS_PASSWORD_FILE`` per service; the URL then carries no secret.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

from myelin.errors import ConfigError
from myelin.nats_identity import security_dir, write_private
from myelin.settings import Settings

ADMIN = "admin"
RULES: dict[str, str] = {
    "features": "~* &* +@all -@admin +bgrewriteaof",
    # read commands, and what a connection needs; not @connection: it holds CLIENT
    # (KILL, PAUSE), which would let a reader cut off or stall the writer
    "inference": "~* &* -@all +@read +ping +hello +auth +echo +select",
    ADMIN: "~* &* +@all",
}


def dev_password_file(settings: Settings, identity: str) -> Path:
    return security_dir(settings) / "redis" / f"{identity}.pass"


def ensure_dev_users(settings: Settings) -> list[str]:
    """A password per identity of :data:`RULES` (kept across restarts); returns the ACL
    lines of redis.conf."""
    lines = ["user default off"]
    for identity, rules in RULES.items():
        path = dev_password_file(settings, identity)
        if not path.exists():
            write_private(path, f"{secrets.token_urlsafe(32)}\n".encode())
        digest = hashlib.sha256(path.read_text().strip().encode()).hexdigest()
        lines.append(f"user {identity} on #{digest} {rules}")
    return lines


def _credentials(settings: Settings, identity: str | None) -> tuple[str, str] | None:
    if settings.redis_username or settings.redis_password_file:
        path = Path(settings.redis_password_file)
        if not path.is_file():
            raise ConfigError(
                f"MYELIN_REDIS_PASSWORD_FILE names {path}, which is not a file "
                "(MYELIN_REDIS_USERNAME needs it)"
            )
        return settings.redis_username or "default", path.read_text().strip()
    # a development password only for the Redis `myelin up` runs (not an operator's own)
    if identity is not None and "MYELIN_REDIS_URL" not in os.environ:
        path = dev_password_file(settings, identity)
        if path.exists():
            return identity, path.read_text().strip()
    return None


def client_url(settings: Settings, identity: str | None = None) -> str:
    """``MYELIN_REDIS_URL`` with the credentials to use: the service's own
    (``MYELIN_REDIS_USERNAME`` / ``_PASSWORD_FILE``), else ``identity``'s development
    password when ``myelin up`` wrote one, else none. Never log what this returns."""
    found = _credentials(settings, identity)
    if found is None:
        return settings.redis_url
    user, password = found
    u = urlsplit(settings.redis_url)
    where = u.netloc.rpartition("@")[2]  # host and port as written ([::1]:6379 too)
    netloc = f"{quote(user, safe='')}:{quote(password, safe='')}@{where}"
    return urlunsplit((u.scheme, netloc, u.path, u.query, u.fragment))
