"""Which requests a canary takes (pure): a sticky hash of the model and entity id, so an
entity sees the same version on every request while the share is unchanged, and raising
the share only adds entities."""

from __future__ import annotations

from hashlib import blake2b

_SPAN = float(1 << 64)


def bucket(model: str, entity_id: str) -> float:
    """A uniform number in [0, 1) fixed by (model, entity id)."""
    digest = blake2b(entity_id.encode(), digest_size=8, person=model.encode()[:16]).digest()
    return int.from_bytes(digest, "big") / _SPAN


def canary_takes(model: str, entity_id: str, share: float) -> bool:
    return share > 0.0 and bucket(model, entity_id) < share
