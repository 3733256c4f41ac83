"""PII tokenization: keyed HMAC tokens that are stable (joins still work) and carry the
key id, so keys can rotate. ``pii:<kid>:<32 hex>``.

Tokenization is not erasure: while a key exists, a low-entropy value (an e-mail) can be
re-tokenized and matched. Keys come from ``MYELIN_PII_KEYS`` (``kid:base64,...``) with
``MYELIN_PII_ACTIVE_KID``; in the embedded stack a random key is created once under the
state directory (mode 0600). Keys are never logged.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import secrets
from pathlib import Path

from myelin.errors import ConfigError

TOKEN_PREFIX = "pii:"  # noqa: S105 - a prefix, not a secret
# a subject token (myelin.subject_keys): its key's name (hash) and the ciphertext
SUBJECT_TOKEN = r"pii:subject:s\.([0-9a-f]{40}):([A-Za-z0-9_-]+)"  # noqa: S105 - a pattern, not a secret
# an HMAC token, or a subject token
_TOKEN = re.compile(rf"pii:[^:]+:[0-9a-f]{{32}}|{SUBJECT_TOKEN}")


class Tokenizer:
    def __init__(self, keys: dict[str, bytes], active_kid: str) -> None:
        if active_kid not in keys:
            raise ConfigError(
                f"PII key id {active_kid!r} is not among the configured keys {sorted(keys)}"
            )
        for kid, key in keys.items():
            if len(key) < 16:
                raise ConfigError(f"PII key {kid!r} is shorter than 16 bytes")
            if ":" in kid:
                raise ConfigError("PII key ids cannot contain ':'")
        self._keys = dict(keys)
        self.kid = active_kid
        self._active = keys[active_kid]

    def token(self, value: str) -> str:
        if not value or _TOKEN.fullmatch(value):
            return value  # empty stays empty; already a token: idempotent (a value that
            # merely starts with "pii:" is tokenized like any other)
        mac = hmac.new(self._active, value.encode(), hashlib.sha256).hexdigest()[:32]
        return f"{TOKEN_PREFIX}{self.kid}:{mac}"

    @property
    def active_key(self) -> bytes:
        """The active key's bytes (subject keys are wrapped under a key derived from it)."""
        return self._active

    def key(self, kid: str) -> bytes | None:
        """Key ``kid``'s bytes (an older one still opens what it wrapped)."""
        return self._keys.get(kid)

    def __repr__(self) -> str:
        return f"Tokenizer(kid={self.kid!r}, keys={sorted(self._keys)})"


def parse_keys(spec: str) -> dict[str, bytes]:
    keys: dict[str, bytes] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        kid, sep, b64 = part.partition(":")
        if not sep:
            raise ConfigError("MYELIN_PII_KEYS must look like 'kid1:BASE64,kid2:BASE64'")
        try:
            keys[kid] = base64.b64decode(b64, validate=True)
        except ValueError:
            raise ConfigError(f"MYELIN_PII_KEYS: key {kid!r} is not valid base64") from None
    return keys


def load_tokenizer(keys_spec: str, active_kid: str, state_dir: Path) -> Tokenizer:
    if keys_spec:
        keys = parse_keys(keys_spec)
        return Tokenizer(keys, active_kid or sorted(keys)[-1])
    path = state_dir / "secrets" / "pii-k1.key"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass  # another process of the stack created it a moment ago
        else:
            with os.fdopen(fd, "wb") as f:
                f.write(secrets.token_bytes(32))
    return Tokenizer({"k1": path.read_bytes()}, "k1")
