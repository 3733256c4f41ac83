"""Per-subject keys for personal data, so that forgetting a person is destroying one key
(crypto-shredding).

A *subject* is the entity an event is about: its contract's key field (``user_id``).
Ingest encrypts each PII field with its subject's own key, deterministically (AES-SIV:
the same value of the same subject gives the same token, so joins and counts on it still
work) as ``pii:subject:<key name>:<base64url>``. The streams are immutable, but once the subject's
key is destroyed none of those tokens can be read, or matched against a guessed value,
by anyone, the platform included.

Keys live in the KV bucket ``myelin_subject_keys`` under ``s.<sha256(subject)>`` (the
subject's id is not a key name), each wrapped (AES-GCM) under a key derived from the
active PII key (``MYELIN_PII_KEYS``; its id is kept beside it, so rotating the active key
leaves older subject keys readable), so a copy of the bucket alone reveals nothing. Erasing a subject overwrites its
key's message in the stream (a secure delete, not a tombstone) and forgets it from every
cache within :data:`CACHE_TTL_S`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import os
import re
import time
from collections.abc import Iterable
from typing import Any

import msgspec
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, AESSIV
from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError, NotFoundError

from myelin.bus import decode_request
from myelin.errors import MyelinError, Poison, Retryable
from myelin.pii import SUBJECT_TOKEN, Tokenizer

BUCKET = "myelin_subject_keys"  # myelin.topology.SUBJECT_KEYS_BUCKET
STREAM = f"KV_{BUCKET}"
TOKEN_PREFIX = "pii:subject:"  # noqa: S105 - a prefix, not a secret
CACHE_TTL_S = 30.0  # how long a process may keep using a key after it was erased
CONCURRENCY = 64  # subject keys read or created at once


class SubjectKeyError(MyelinError):
    code = "subject_key_error"


class EraseSubject(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What governance's erasure asks the features service and the warehouse."""

    subject: str


_erase_dec = msgspec.json.Decoder(EraseSubject)


def erase_request_subject(data: bytes) -> str:
    """The subject of an erase request; :class:`Poison` for a bad or empty one."""
    subject = decode_request(_erase_dec, data, "erase").subject
    if not subject:
        raise Poison("an erasure names its subject (the entity id)")
    return subject


def key_name(subject: str) -> str:
    return "s." + hashlib.sha256(subject.encode()).hexdigest()[:40]


def master_key(pii_key: bytes) -> bytes:
    """The wrapping key, derived from a PII key (separated from its HMAC use)."""
    return hashlib.sha256(b"myelin subject-key wrap v1\x00" + pii_key).digest()


def wrap(tok: Tokenizer, name: str, key: bytes) -> bytes:
    """``key`` sealed under the active PII key, bound to its KV key ``name``; the key id
    is kept beside it, so a rotated-out key still opens what it wrapped."""
    nonce = os.urandom(12)
    ct = AESGCM(master_key(tok.active_key)).encrypt(nonce, key, name.encode())
    return b"v1:" + tok.kid.encode() + b":" + nonce + ct


def unwrap(tok: Tokenizer, name: str, blob: bytes) -> bytes:
    _v, kid, rest = [*blob.split(b":", 2), b"", b""][:3]
    pii_key = tok.key(kid.decode(errors="replace"))
    if not blob.startswith(b"v1:") or pii_key is None:
        raise SubjectKeyError(
            f"a subject key is wrapped under PII key {kid!r}, which MYELIN_PII_KEYS lacks"
        )
    try:
        return AESGCM(master_key(pii_key)).decrypt(rest[:12], rest[12:], name.encode())
    except InvalidTag:
        raise SubjectKeyError(
            f"a subject key does not open under PII key {kid!r} (was that key replaced?)"
        ) from None


_TOKEN = re.compile(SUBJECT_TOKEN)


def is_token(value: str) -> bool:
    """Whether ``value`` is a whole subject token (a value merely starting ``pii:`` is
    not: it is sealed like any other)."""
    return _TOKEN.fullmatch(value) is not None


def seal(key: bytes, subject: str, value: str) -> str:
    """A PII value as its subject's token, deterministic for a subject and value. It names
    the subject's key (by hash), so an allowed reader can open it wherever it is found."""
    ct = AESSIV(key).encrypt(value.encode(), None)
    return (
        f"{TOKEN_PREFIX}{key_name(subject)}:" + base64.urlsafe_b64encode(ct).rstrip(b"=").decode()
    )


def open_token(key: bytes, token: str) -> str:
    """The value behind a token; raises :class:`SubjectKeyError`."""
    m = _TOKEN.fullmatch(token)
    if m is None:
        raise SubjectKeyError("not a subject token")
    return _open(key, m.group(2))


def _open(key: bytes, b64: str) -> str:
    try:
        ct = base64.urlsafe_b64decode(b64 + "=" * (-len(b64) % 4))
        return AESSIV(key).decrypt(ct, None).decode()
    except (InvalidTag, ValueError):
        raise SubjectKeyError("the token does not open with this subject's key") from None


class SubjectKeys:
    """Subject keys in NATS KV, created on first use, cached for :data:`CACHE_TTL_S`."""

    def __init__(self, js: JetStreamContext, tokenizer: Tokenizer | None) -> None:
        """``tokenizer``: the PII keys that wrap subject keys (``None``: this holder only
        erases keys, it can neither create nor open one)."""
        self._js = js
        self._tok = tokenizer
        self._kv: Any = None
        self._cache: dict[str, tuple[bytes, float]] = {}

    async def _bucket(self) -> Any:
        if self._kv is None:
            self._kv = await self._js.key_value(BUCKET)
        return self._kv

    async def keys_for(self, subjects: Iterable[str]) -> dict[str, bytes]:
        """Each subject's key, created when it has none. A subject seen in the last half
        minute costs nothing; the others are read (or created) concurrently, up to
        :data:`CONCURRENCY` at once: a batch that brings a thousand new subjects waits
        for a few round trips, not a thousand."""
        now = time.monotonic()
        out: dict[str, bytes] = {}
        missing: list[str] = []
        for subject in subjects:
            hit = self._cache.get(subject)
            if hit is not None and hit[1] > now:
                out[subject] = hit[0]
            else:
                missing.append(subject)
        if missing:
            gate = asyncio.Semaphore(CONCURRENCY)

            async def one(subject: str) -> bytes:
                async with gate:
                    return await self._get_or_create(subject)

            keys = await asyncio.gather(*(one(s) for s in missing))
            expires = time.monotonic() + CACHE_TTL_S
            for subject, key in zip(missing, keys, strict=True):
                self._cache[subject] = (key, expires)
                out[subject] = key
        if len(self._cache) > 100_000:
            self._cache = {s: v for s, v in self._cache.items() if v[1] > now}
        return out

    async def find(self, subject: str) -> bytes | None:
        """The subject's key, or ``None`` (never had one, or erased)."""
        return await self._find_named(key_name(subject))

    async def _find_named(self, name: str) -> bytes | None:
        kv = await self._bucket()
        try:
            entry = await kv.get(name)
        except KeyNotFoundError:
            return None
        if not entry.value:
            return None
        if self._tok is None:
            raise SubjectKeyError("this process holds no PII key: it cannot open subject keys")
        return unwrap(self._tok, name, entry.value)

    async def reveal(self, texts: Iterable[str]) -> dict[str, str]:
        """Every subject token found in ``texts`` -> its value, for the tokens whose key
        still exists (an erased subject's stay tokens: nobody can open them)."""
        found: dict[str, tuple[str, str]] = {}
        for text in texts:
            for m in _TOKEN.finditer(text):
                found[m.group(0)] = (f"s.{m.group(1)}", m.group(2))
        keys: dict[str, bytes | None] = {}
        out: dict[str, str] = {}
        for token, (name, b64) in found.items():
            if name not in keys:
                keys[name] = await self._find_named(name)
            key = keys[name]
            if key is not None:
                with contextlib.suppress(SubjectKeyError):
                    out[token] = _open(key, b64)
        return out

    async def _get_or_create(self, subject: str) -> bytes:
        kv = await self._bucket()
        for _ in range(5):
            found = await self.find(subject)
            if found is not None:
                return found
            if self._tok is None:
                raise SubjectKeyError("this process holds no PII key: it cannot create keys")
            key = AESSIV.generate_key(256)
            try:
                name = key_name(subject)
                await kv.create(name, wrap(self._tok, name, key))
                return key
            except KeyWrongLastSequenceError:
                continue  # another ingest worker created it first (or a tombstone): read it
        raise Retryable(f"could not create or read the key of a subject ({key_name(subject)})")

    async def erase(self, subject: str) -> int:
        """Destroy the subject's key: every message of its KV key is overwritten on disk
        (JetStream's secure delete) and the key is gone. Returns the messages erased;
        raises (never reports success) unless the key is verifiably gone."""
        name = key_name(subject)
        self._cache.pop(subject, None)
        erased = 0
        subject_filter = f"$KV.{BUCKET}.{name}"
        while True:
            try:
                msg = await self._js.get_last_msg(STREAM, subject_filter)
            except NotFoundError:
                break  # none left: the only way out that is not an error
            if msg.seq is None:
                raise SubjectKeyError(f"a message of {name} has no sequence")
            await self._js.delete_msg(STREAM, msg.seq)  # erase: overwritten, not just marked
            erased += 1
        return erased
