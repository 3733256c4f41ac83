"""The event payloads Myelin ships with: an e-commerce clickstream.

Frozen msgspec Structs. Evolve them only by adding fields with defaults, as a new
schema version registered in :mod:`myelin.contracts.registry`.
"""

from __future__ import annotations

from typing import Annotated

import msgspec

Key = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]


class ImpressionV1(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """An item was shown to a user."""

    user_id: Key
    item_id: Key
    position: Annotated[int, msgspec.Meta(ge=0, le=10_000)] = 0


class ClickV1(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A user clicked an item."""

    user_id: Key
    item_id: Key


class PurchaseV1(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A user bought an item."""

    user_id: Key
    item_id: Key
    amount: Annotated[float, msgspec.Meta(ge=0.0, le=1_000_000.0)]
    currency: Annotated[str, msgspec.Meta(pattern=r"^[A-Z]{3}$")] = "EUR"


class PurchaseV2(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A user bought an item; v2 adds the buyer's e-mail (PII: tokenized at ingest)."""

    user_id: Key
    item_id: Key
    amount: Annotated[float, msgspec.Meta(ge=0.0, le=1_000_000.0)]
    currency: Annotated[str, msgspec.Meta(pattern=r"^[A-Z]{3}$")] = "EUR"
    email: Annotated[str, msgspec.Meta(max_length=320)] = ""
