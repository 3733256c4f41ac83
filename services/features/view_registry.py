"""Outbound adapter: feature view versions in NATS KV (bucket ``myelin_views``).

Key ``<view>.<hash>``, value the definition (JSON). A version is written once: a changed
definition has a new hash, so it is a new key beside the old one. Retiring a version
deletes its key. Which version is *served* lives with the data, in the online store.
"""

from __future__ import annotations

from typing import Any

import msgspec
from nats.js import JetStreamContext
from nats.js.errors import (
    KeyNotFoundError,
    KeyWrongLastSequenceError,
)

from myelin.bus import kv_bucket, kv_keys
from myelin.subjects import VIEWS_BUCKET
from services.features.views import FeatureView, InvalidView, view_doc, view_from_doc

_enc = msgspec.json.Encoder()


class ViewRegistry:
    def __init__(self, js: JetStreamContext) -> None:
        self._js = js
        self._kv: Any = None

    async def _bucket(self) -> Any:
        if self._kv is None:
            self._kv = await kv_bucket(self._js, VIEWS_BUCKET)
        return self._kv

    async def register(self, view: FeatureView) -> bool:
        """Store a version; False if it was there already (same definition, same hash)."""
        kv = await self._bucket()
        try:
            await kv.create(f"{view.name}.{view.content_hash}", _enc.encode(view_doc(view)))
        except KeyWrongLastSequenceError:
            return False
        return True

    async def versions(self) -> tuple[list[FeatureView], dict[str, str]]:
        """The stored versions, and the keys of those that no longer read as a valid
        definition (stored by an older build, or by hand) with why: those are not run."""
        kv = await self._bucket()
        out = []
        broken: dict[str, str] = {}
        for k in await kv_keys(self._js, VIEWS_BUCKET):
            try:
                entry = await kv.get(k)
            except KeyNotFoundError:
                continue  # retired
            try:
                out.append(view_from_doc(msgspec.json.decode(entry.value)))
            except (InvalidView, msgspec.MsgspecError, UnicodeDecodeError, RecursionError) as exc:
                broken[k] = str(exc)
        return out, broken

    async def retire(self, view: FeatureView) -> None:
        kv = await self._bucket()
        await kv.delete(f"{view.name}.{view.content_hash}")
