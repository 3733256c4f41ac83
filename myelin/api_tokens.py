"""Bearer tokens for the HTTP and gRPC doors: a token names an identity.

Servers hold only the tokens' SHA-256 digests, in a JSON file (``MYELIN_API_TOKENS_FILE``:
``{"<sha256 hex>": "<identity>"}``); a client sends ``Authorization: Bearer <token>``.
``myelin up`` writes one token per client identity under ``.myelin/security/tokens/``
(``producer.token`` for HTTP ingest, ``app.token`` for gRPC Predict, ``operator.token``),
each 0600, and the digests beside them. Without a tokens file a door takes every caller
(a server run without authentication, as in the integration tests).
"""

from __future__ import annotations

import hashlib
import json
import secrets
from dataclasses import dataclass
from pathlib import Path

from myelin.errors import ConfigError
from myelin.nats_identity import check_identity, security_dir, write_private
from myelin.settings import Settings

#: the identities that get a development token
TOKEN_IDENTITIES = ("producer", "app", "operator")


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class TokenBook:
    """Who each token is: ``identify`` maps an ``Authorization`` header to an identity."""

    identities: dict[str, str]  # sha256 hex -> identity

    @classmethod
    def load(cls, settings: Settings) -> TokenBook | None:
        """The book named by ``MYELIN_API_TOKENS_FILE``, or ``None`` (no authentication)."""
        if not settings.api_tokens_file:
            return None
        path = Path(settings.api_tokens_file)
        try:
            raw = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"MYELIN_API_TOKENS_FILE {path}: {exc}") from None
        if not isinstance(raw, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in raw.items()
        ):
            raise ConfigError(
                f'MYELIN_API_TOKENS_FILE {path} must map token digests to identities: {{"<sha256 hex>": "<identity>"}}'
            )
        return cls({k: check_identity(v) for k, v in raw.items()})

    def identify(self, authorization: str | None) -> str | None:
        """The identity of ``Authorization: Bearer <token>``, or ``None``."""
        if not authorization:
            return None
        scheme, _, token = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        return self.identities.get(digest(token.strip()))


def dev_token_file(settings: Settings, identity: str) -> Path:
    return security_dir(settings) / "tokens" / f"{identity}.token"


def dev_book_file(settings: Settings) -> Path:
    return security_dir(settings) / "api_tokens.json"


def ensure_dev_tokens(settings: Settings) -> Path:
    """A token per :data:`TOKEN_IDENTITIES` (kept across restarts) and the digest book the
    services read; returns the book's path."""
    book: dict[str, str] = {}
    for identity in TOKEN_IDENTITIES:
        path = dev_token_file(settings, identity)
        if not path.exists():
            write_private(path, f"myl_{secrets.token_urlsafe(32)}\n".encode())
        book[digest(path.read_text().strip())] = identity
    out = dev_book_file(settings)
    write_private(out, json.dumps(book, indent=2, sort_keys=True).encode())
    return out


def client_token(settings: Settings, identity: str) -> str | None:
    """A client's token: ``MYELIN_API_TOKEN`` if set, else the development token of
    ``identity`` when ``myelin up`` wrote one, else ``None``."""
    if settings.api_token:
        return settings.api_token.get()
    path = dev_token_file(settings, identity)
    return path.read_text().strip() if path.exists() else None


def client_headers(settings: Settings, identity: str = "producer") -> dict[str, str]:
    """``Authorization`` for an HTTP client of this deployment (empty without a token)."""
    token = client_token(settings, identity)
    return {"Authorization": f"Bearer {token}"} if token else {}
