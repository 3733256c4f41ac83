"""Feature views, declared once. One definition drives the online (Redis) and offline
(ClickHouse) values, so they cannot drift apart. A view's identity is a content hash of
its definition: change the definition and you get a new version.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Literal

AggKind = Literal["count", "sum", "ratio"]


@dataclass(frozen=True)
class Feature:
    """``count``/``sum`` of ``source`` events (``field`` for sum) over a sliding window of
    ``window_s`` seconds; ``ratio`` divides two other features of the view (0 when the
    denominator is 0)."""

    name: str
    kind: AggKind
    window_s: int = 0
    source: str = ""
    field: str = ""
    numerator: str = ""
    denominator: str = ""


@dataclass(frozen=True)
class FeatureView:
    name: str
    entity: str
    sources: tuple[str, ...]
    features: tuple[Feature, ...]
    bucket_s: int = 60  # sliding windows hop by one bucket
    ttl_s: int = 24 * 3600
    freshness_s: int = 15 * 60

    def __post_init__(self) -> None:
        names = [f.name for f in self.features]
        if len(set(names)) != len(names):
            raise ValueError(f"view {self.name}: duplicate feature names")
        for f in self.features:
            if f.kind == "ratio":
                if f.numerator not in names or f.denominator not in names:
                    raise ValueError(f"view {self.name}: ratio {f.name} names unknown features")
            else:
                if f.source not in self.sources:
                    raise ValueError(f"view {self.name}: {f.name} reads {f.source!r}, not a source")
                if f.window_s <= 0 or f.window_s % self.bucket_s:
                    raise ValueError(
                        f"view {self.name}: {f.name} window must be a multiple of bucket_s"
                    )
                if f.kind == "sum" and not f.field:
                    raise ValueError(f"view {self.name}: sum {f.name} needs a field")

    @property
    def content_hash(self) -> str:
        doc = json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(doc.encode()).hexdigest()[:16]

    @property
    def feature_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.features)

    @property
    def max_window_s(self) -> int:
        return max(f.window_s for f in self.features if f.kind != "ratio")


USER_ACTIVITY = FeatureView(
    name="user_activity",
    entity="user_id",
    sources=("impression", "click", "purchase"),
    features=(
        Feature("impressions_10m", "count", 600, "impression"),
        Feature("clicks_10m", "count", 600, "click"),
        Feature("ctr_10m", "ratio", numerator="clicks_10m", denominator="impressions_10m"),
        Feature("impressions_1h", "count", 3600, "impression"),
        Feature("clicks_1h", "count", 3600, "click"),
        Feature("ctr_1h", "ratio", numerator="clicks_1h", denominator="impressions_1h"),
        Feature("purchases_1h", "count", 3600, "purchase"),
        Feature("spend_1h", "sum", 3600, "purchase", field="amount"),
    ),
)

VIEWS: tuple[FeatureView, ...] = (USER_ACTIVITY,)
