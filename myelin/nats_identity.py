"""Who a NATS connection is: its identity and the nkey that proves it.

Every service and client connects as one identity (``ingest``, ``governance``,
``operator``, a producer, ...). The server knows each identity by its nkey's public key,
with publish / subscribe permissions generated from the topology (:mod:`myelin.access`);
the client holds the seed, in a file readable by its owner only.

Which credential a process uses:
1. ``MYELIN_NATS_NKEY_FILE``: a seed file, named ``<identity>.nk`` (a mounted secret in a
   real deployment; ``myelin up`` hands each service its own);
2. otherwise, when ``myelin up`` has generated development credentials in the state dir,
   the identity asked for there (``operator`` for the command line);
3. otherwise none: the server must then accept unauthenticated clients (a bare
   nats-server in tests), and requests say they come from ``anonymous``.

Requests carry their caller's identity as the last token of the subject
(``myelin.rpc.governance.promote.operator``); the server lets each identity publish only
under its own name, so a responder reads an authenticated caller from the subject.
"""

from __future__ import annotations

import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

import nkeys

from myelin.errors import ConfigError
from myelin.settings import Settings

ANONYMOUS = "anonymous"
_IDENTITY = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")


def check_identity(name: str) -> str:
    if not _IDENTITY.match(name):
        raise ConfigError(
            f"identity {name!r} must match {_IDENTITY.pattern} (it is a NATS subject token)"
        )
    return name


@dataclass(frozen=True)
class NatsCredential:
    identity: str
    seed_file: Path

    def public_key(self) -> str:
        return public_key(self.seed_file.read_bytes().strip())


def inbox_prefix(identity: str) -> str:
    """Replies to an identity's requests arrive under this prefix, which only it may
    subscribe to (the default ``_INBOX`` would let anyone read everyone's replies)."""
    return f"_INBOX_{identity}"


def security_dir(settings: Settings) -> Path:
    """Development credentials written by ``myelin up`` (0700; every file 0600)."""
    return settings.state_dir / "security"


def dev_seed_file(settings: Settings, identity: str) -> Path:
    return security_dir(settings) / "nats" / f"{identity}.nk"


def resolve(settings: Settings, identity: str | None = None) -> NatsCredential | None:
    """The credential a connection uses (see the module docstring), or ``None``."""
    if identity is not None:
        dev = dev_seed_file(settings, identity)
        if dev.exists():
            return NatsCredential(identity, dev)
    if settings.nats_nkey_file:
        path = Path(settings.nats_nkey_file)
        if not path.is_file():
            raise ConfigError(f"MYELIN_NATS_NKEY_FILE names {path}, which is not a file")
        return NatsCredential(check_identity(path.name.removesuffix(".nk")), path)
    dev = dev_seed_file(settings, "operator")
    if dev.exists():
        return NatsCredential("operator", dev)
    return None


def new_seed() -> bytes:
    """A new user nkey seed (``SU...``)."""
    seed: bytes = nkeys.encode_seed(secrets.token_bytes(32), nkeys.PREFIX_BYTE_USER)
    return seed


def public_key(seed: bytes) -> str:
    kp = nkeys.from_seed(bytearray(seed))
    try:
        key: bytes = kp.public_key
        return key.decode()
    finally:
        kp.wipe()


def write_private(path: Path, data: bytes) -> None:
    """Write a secret readable by its owner only (0600, in a 0700 directory), never
    through a moment of wider permissions."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path.parent, 0o700)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def ensure_dev_seeds(settings: Settings, identities: list[str]) -> dict[str, NatsCredential]:
    """A seed file per identity under the state dir, created once and kept across restarts
    (a running client keeps working after ``myelin up`` is started again)."""
    out: dict[str, NatsCredential] = {}
    for identity in identities:
        path = dev_seed_file(settings, check_identity(identity))
        if not path.exists():
            write_private(path, new_seed() + b"\n")
        out[identity] = NatsCredential(identity, path)
    return out
