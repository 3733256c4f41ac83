"""Accumulator slots: what a bucket row holds for each ``(source, field, family)`` a
view needs (layout in :mod:`services.features.logic`)."""

from __future__ import annotations

import zlib
from bisect import insort
from typing import Any

from services.features.views import Feature

KMV_K = 64
FAMILY = {
    "count": "n",
    "sum": "s",
    "mean": "s",
    "stddev": "s",
    "min": "mm",
    "max": "mm",
    "last": "last",
    "distinct": "kmv",
}
# Empty slots are small ints and None (a state is written to Redis on every batch that
# touches its entity: msgpack spends 1 byte on 0 or nil, 9 on a float).
FRESH: dict[str, list[Any]] = {
    "n": [0],
    "s": [0, 0, 0],
    "mm": [None, None],
    "last": [-1, None],
    "kmv": [None],  # replaced by a new list per bucket
}


def slot_key(f: Feature) -> tuple[str, str, str]:
    """The slot a (non-ratio) feature reads: counts of one source share a slot."""
    return (f.source, f.field if f.kind != "count" else "", FAMILY[f.kind])


def kmv_add(slot: list[int], value: Any) -> None:
    h = zlib.crc32(str(value).encode())
    if h not in slot and (len(slot) < KMV_K or h < slot[-1]):
        insort(slot, h)
        del slot[KMV_K:]
