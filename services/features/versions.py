"""Feature view versions side by side: the pure rules of promotion and retirement.

A new definition is a new version (its content hash). It gets its own consumer from the
start of the EVENTS stream (a backfill by replay, beside the served version), its own
online keys and its own offline rows (``view_hash``). Promotion swaps the view's served
pointer in one atomic step once the new version has caught up, so reads never see a gap;
models keep reading the version they were trained on (pinned in their provenance).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from myelin.errors import MyelinError
from services.features.views import FeatureView


class VersionError(MyelinError):
    code = "view_version_error"


class UnknownVersion(VersionError):
    code = "unknown_view_version"


class PromotionRefused(VersionError):
    code = "promotion_denied"


@dataclass(frozen=True)
class VersionState:
    view: FeatureView
    position: int
    served: bool


def parse_ref(ref: str) -> tuple[str, str]:
    """``name@hash`` or ``name`` (the served version) -> (name, hash or '')."""
    name, _, version = ref.partition("@")
    if not name:
        raise VersionError(f"{ref!r}: give a view as NAME or NAME@HASH")
    return name, version


def promotion_input(
    candidate: VersionState, served: VersionState | None, stream_last_seq: int, requester: str
) -> dict[str, Any]:
    """What governance sees when asked to serve ``candidate`` (policy ``serve_view``)."""
    old = set(served.view.feature_names) if served else set()
    new = set(candidate.view.feature_names)
    return {
        "requester": requester,
        "view": candidate.view.name,
        "version": candidate.view.content_hash,
        "served_version": served.view.content_hash if served else "",
        "position": candidate.position,
        "served_position": served.position if served else 0,
        "stream_last_seq": stream_last_seq,
        "lag_messages": max(0, stream_last_seq - candidate.position),
        "behind_served_messages": max(0, (served.position if served else 0) - candidate.position),
        "features_added": sorted(new - old),
        "features_removed": sorted(old - new),
    }
