"""Per-subject keys for personal data, so that forgetting a person is destroying one key
(crypto-shredding).

A *subject* is the entity an event is about: its contract's key field (``user_id``).
Ingest encrypts each PII field with its subject's own key, deterministically (AES-SIV:
the same value of the same subject gives the same token, so joins and counts on it still
work) as ``pii:subject:<base64url>``. The streams are immutable, but once the subject's
key is destroyed none of those tokens can be read, or matched against a guessed value,
by anyone, the platform included.

Keys live in the KV bucket ``myelin_subject_keys`` under ``s.<sha256(subject)>`` (the
subject's id is not a key name), each wrapped (AES-GCM) under the deployment's PII master
key, so a copy of the bucket alone reveals nothing. Erasing a subject overwrites its
key's message in the stream (a secure delete, not a tombstone) and forgets it from every
cache within :data:`CACHE_TTL_S`.
"""

from __future__ import annotations

import base64
import hashlib
import os
import time
from collections.abc import Iterable
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, AESSIV
from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError

from myelin.errors import MyelinError, Retryable

BUCKET = "myelin_subject_keys"  # myelin.topology.SUBJECT_KEYS_BUCKET
STREAM = f"KV_{BUCKET}"
TOKEN_PREFIX = "pii:subject:"  # noqa: S105 - a prefix, not a secret
CACHE_TTL_S = 30.0  # how long a process may keep using a key after it was erased


class SubjectKeyError(MyelinError):
    code = "subject_key_error"


def key_name(subject: str) -> str:
    return "s." + hashlib.sha256(subject.encode()).hexdigest()[:40]


def master_key(pii_key: bytes) -> bytes:
    """The wrapping key, derived from the PII key (separated from its HMAC use)."""
    return hashlib.sha256(b"myelin subject-key wrap v1\x00" + pii_key).digest()


def wrap(master: bytes, subject: str, key: bytes) -> bytes:
    nonce = os.urandom(12)
    return nonce + AESGCM(master).encrypt(nonce, key, key_name(subject).encode())


def unwrap(master: bytes, subject: str, blob: bytes) -> bytes:
    try:
        return AESGCM(master).decrypt(blob[:12], blob[12:], key_name(subject).encode())
    except InvalidTag:
        raise SubjectKeyError(
            "a subject key does not open under this PII master key (was MYELIN_PII_KEYS changed?)"
        ) from None


def seal(key: bytes, field: str, value: str) -> str:
    """A PII value as its subject's token (deterministic for a subject, field and value)."""
    ct = AESSIV(key).encrypt(value.encode(), [field.encode()])
    return TOKEN_PREFIX + base64.urlsafe_b64encode(ct).rstrip(b"=").decode()


def open_token(key: bytes, field: str, token: str) -> str:
    """The value behind a token (for an allowed PII read); raises :class:`SubjectKeyError`."""
    if not token.startswith(TOKEN_PREFIX):
        raise SubjectKeyError("not a subject token")
    raw = token[len(TOKEN_PREFIX) :]
    try:
        ct = base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4))
        return AESSIV(key).decrypt(ct, [field.encode()]).decode()
    except (InvalidTag, ValueError):
        raise SubjectKeyError("the token does not open with this subject's key") from None


class SubjectKeys:
    """Subject keys in NATS KV, created on first use, cached for :data:`CACHE_TTL_S`."""

    def __init__(self, js: JetStreamContext, pii_key: bytes) -> None:
        self._js = js
        self._master = master_key(pii_key)
        self._kv: Any = None
        self._cache: dict[str, tuple[bytes, float]] = {}

    async def _bucket(self) -> Any:
        if self._kv is None:
            self._kv = await self._js.key_value(BUCKET)
        return self._kv

    async def keys_for(self, subjects: Iterable[str]) -> dict[str, bytes]:
        """Each subject's key, created when it has none (one KV round trip per subject
        not cached; the common case, a subject seen in the last half minute, costs none)."""
        now = time.monotonic()
        out: dict[str, bytes] = {}
        for subject in subjects:
            hit = self._cache.get(subject)
            if hit is not None and hit[1] > now:
                out[subject] = hit[0]
                continue
            key = await self._get_or_create(subject)
            self._cache[subject] = (key, now + CACHE_TTL_S)
            out[subject] = key
        if len(self._cache) > 100_000:
            self._cache = {s: v for s, v in self._cache.items() if v[1] > now}
        return out

    async def find(self, subject: str) -> bytes | None:
        """The subject's key, or ``None`` (never had one, or erased)."""
        kv = await self._bucket()
        try:
            entry = await kv.get(key_name(subject))
        except KeyNotFoundError:
            return None
        if not entry.value:
            return None
        return unwrap(self._master, subject, entry.value)

    async def _get_or_create(self, subject: str) -> bytes:
        kv = await self._bucket()
        for _ in range(5):
            found = await self.find(subject)
            if found is not None:
                return found
            key = AESSIV.generate_key(256)
            try:
                await kv.create(key_name(subject), wrap(self._master, subject, key))
                return key
            except KeyWrongLastSequenceError:
                continue  # another ingest worker created it first (or a tombstone): read it
        raise Retryable(f"could not create or read the key of a subject ({key_name(subject)})")

    async def erase(self, subject: str) -> int:
        """Destroy the subject's key: every message of its KV key is overwritten on disk
        (JetStream's secure delete) and the key is gone. Returns the messages erased."""
        name = key_name(subject)
        self._cache.pop(subject, None)
        erased = 0
        subject_filter = f"$KV.{BUCKET}.{name}"
        while True:
            try:
                msg = await self._js.get_last_msg(STREAM, subject_filter)
            except Exception:  # noqa: BLE001 - no message left on that subject
                break
            if msg.seq is None:
                break
            await self._js.delete_msg(STREAM, msg.seq)  # erase: overwritten, not just marked
            erased += 1
        return erased
