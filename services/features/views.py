"""Feature views, declared once. One definition drives the online (Redis) and offline
(ClickHouse) values, so they cannot drift apart. A view's identity is a content hash of
its definition: change the definition and you get a new version.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from typing import TYPE_CHECKING, Annotated, Any, Literal

import msgspec

from myelin import retention
from myelin.errors import MyelinError

if TYPE_CHECKING:
    from myelin.contracts import ContractRegistry

MAX_WINDOW_S = 90 * 86400  # a window's state lives in Redis: keep it bounded
Seconds = Annotated[int, msgspec.Meta(ge=0, le=MAX_WINDOW_S)]
AggKind = Literal["count", "sum", "mean", "min", "max", "last", "stddev", "distinct", "ratio"]
WindowKind = Literal["sliding", "tumbling", "session"]
NEEDS_FIELD = ("sum", "mean", "min", "max", "last", "stddev", "distinct")
NUMERIC = ("sum", "mean", "min", "max", "last", "stddev")  # their field must hold numbers


class Feature(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """An aggregation of ``source`` events (of their ``field`` where the kind needs one).

    Windows, in event time, with the view's bucket as resolution:
    - ``sliding``: the last ``window_s`` seconds, hopping by one bucket;
    - ``tumbling``: the current aligned block of ``window_s`` seconds;
    - ``session``: the entity's current run of activity, where gaps are at most ``gap_s``,
      capped at ``window_s``.
    ``distinct`` is approximate beyond 64 distinct values (KMV sketch, ~12% error); below
    that it is exact. ``ratio`` divides two other features of the view (0 when the
    denominator is 0), ratios included, in any order. Aggregations with no event in their
    window read NaN (count and sum read 0). A field that is null, or absent from the
    event's schema version, is skipped by the aggregation (as SQL skips NULL); ``count``
    counts events."""

    name: str
    kind: AggKind
    window_s: Seconds = 0
    source: str = ""
    field: str = ""
    numerator: str = ""
    denominator: str = ""
    window: WindowKind = "sliding"
    gap_s: Seconds = 0


class FeatureView(msgspec.Struct, frozen=True, forbid_unknown_fields=True, dict=True):
    name: str
    entity: str
    sources: tuple[str, ...]
    features: tuple[Feature, ...]
    bucket_s: Annotated[int, msgspec.Meta(ge=1, le=86400)] = 60  # sliding windows hop by one bucket
    ttl_s: Annotated[int, msgspec.Meta(ge=1)] = 24 * 3600
    freshness_s: Annotated[int, msgspec.Meta(ge=1)] = 15 * 60
    # An event more than this behind its partition's watermark (the newest event time seen
    # in that partition) is late, even if its entity has seen nothing newer.
    allowed_lateness_s: Annotated[int, msgspec.Meta(ge=0)] = 3600

    def __post_init__(self) -> None:
        # The Annotated bounds are checked when a definition is decoded (msgspec.convert);
        # a view built in code gets the same checks here.
        if not 1 <= self.bucket_s <= 86400:
            raise ValueError(f"view {self.name}: bucket_s must be 1..86400 seconds")
        if not self.sources or len(set(self.sources)) != len(self.sources):
            raise ValueError(
                f"view {self.name}: sources must be distinct event types, at least one"
            )
        if not _NAME.match(self.name):
            raise ValueError(f"view name {self.name!r}: use a-z, 0-9 and _, starting with a letter")
        if not self.features:
            raise ValueError(f"view {self.name}: no features")
        names = [f.name for f in self.features]
        bad = [n for n in names if not _NAME.match(n)]
        if bad:
            raise ValueError(f"view {self.name}: feature names {bad} are not plain identifiers")
        if len(set(names)) != len(names):
            raise ValueError(f"view {self.name}: duplicate feature names")
        for f in self.features:
            where = f"view {self.name}: {f.name}"
            if f.kind == "ratio":
                for operand in (f.numerator, f.denominator):
                    if operand not in names:
                        raise ValueError(
                            f"{where}: ratio of {operand!r}, which is not a feature of the view"
                        )
                continue
            if f.source not in self.sources:
                raise ValueError(f"{where}: reads {f.source!r}, not a source")
            if not 0 < f.window_s <= MAX_WINDOW_S or f.window_s % self.bucket_s:
                raise ValueError(
                    f"{where}: window_s {f.window_s} must be a positive multiple of bucket_s "
                    f"({self.bucket_s}), at most {MAX_WINDOW_S}"
                )
            if f.kind in NEEDS_FIELD and not f.field:
                raise ValueError(f"{where}: a {f.kind} needs a field")
            if f.window == "session" and (
                f.gap_s <= 0 or f.gap_s % self.bucket_s or f.gap_s > f.window_s
            ):
                raise ValueError(
                    f"{where}: a session window needs gap_s, a multiple of bucket_s "
                    "no longer than window_s"
                )
        self.ratio_order()  # refuses a cycle of ratios
        if self.ttl_s < self.max_window_s:
            raise ValueError(
                f"view {self.name}: ttl_s {self.ttl_s} is shorter than its longest window "
                f"({self.max_window_s} s)"
            )
        longest = retention.online_max_ttl_s()
        if self.ttl_s > longest:
            raise ValueError(
                f"view {self.name}: ttl_s {self.ttl_s} is longer than the online store's "
                f"retention ({longest:.0f} s, myelin/retention.py)"
            )

    @property
    def ref(self) -> str:
        """``name@hash``: one version of the view."""
        return f"{self.name}@{self.content_hash}"

    @functools.cached_property  # a definition is frozen: hash it once
    def content_hash(self) -> str:
        doc = json.dumps(view_doc(self), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(doc.encode()).hexdigest()[:16]

    @functools.cached_property
    def feature_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.features)

    @property
    def max_window_s(self) -> int:
        return max(f.window_s for f in self.features if f.kind != "ratio")

    def ratio_order(self) -> list[int]:
        """Indexes of the ratio features in an order where each comes after the ratios it
        divides (a ratio may divide ratios declared after it); a cycle is refused."""
        by_name = {f.name: k for k, f in enumerate(self.features)}
        done: set[int] = set()
        order: list[int] = []

        def visit(k: int, path: tuple[str, ...]) -> None:
            f = self.features[k]
            if k in done or f.kind != "ratio":
                return
            if f.name in path:
                cycle = " -> ".join((*path[path.index(f.name) :], f.name))
                raise ValueError(f"view {self.name}: ratios divide each other in a cycle: {cycle}")
            for operand in (f.numerator, f.denominator):
                visit(by_name[operand], (*path, f.name))
            done.add(k)
            order.append(k)

        for k in range(len(self.features)):
            visit(k, ())
        return order


_NAME = re.compile(r"^[a-z][a-z0-9_]{0,63}$")


class InvalidView(MyelinError):
    code = "invalid_view"


def view_doc(view: FeatureView) -> dict[str, Any]:
    """The definition as JSON-ready builtins (what ``view_from_doc`` reads back)."""
    doc: dict[str, Any] = msgspec.to_builtins(view)
    return doc


def view_from_doc(doc: Any) -> FeatureView:
    """A definition from JSON builtins, with a specific error for anything wrong in it
    (types and unknown fields by msgspec, the rules by ``FeatureView.__post_init__``)."""
    try:
        return msgspec.convert(doc, FeatureView)
    except msgspec.ValidationError as exc:
        raise InvalidView(f"invalid feature view: {exc}") from None


def contract_problems(view: FeatureView, registry: ContractRegistry) -> list[str]:
    """What a view reads that the registered event contracts do not have: every problem,
    each naming the feature, the event type and what is wrong (empty: the view can run)."""
    problems: list[str] = []
    types = registry.types()
    versions: dict[str, list[Any]] = {}
    for src in view.sources:
        specs = [c.spec for c in registry if c.type == src and c.spec is not None]
        if not specs:
            problems.append(
                f"source {src!r} is not a registered event type (registered: {', '.join(types)})"
            )
            continue
        versions[src] = specs
        keys = sorted({s.key_field for s in specs})
        if keys != [view.entity]:
            problems.append(
                f"source {src!r} is keyed by {', '.join(keys)}, not the view's entity {view.entity!r}"
            )
    for f in view.features:
        if f.kind == "ratio" or f.kind not in NEEDS_FIELD or f.source not in versions:
            continue
        specs = versions[f.source]
        found = [fs for s in specs if (fs := s.field(f.field)) is not None]
        if not found:
            fields = sorted({fs.name for s in specs for fs in s.fields})
            problems.append(
                f"{f.name}: no version of {f.source!r} has a field {f.field!r} "
                f"(its fields: {', '.join(fields)})"
            )
        elif f.kind in NUMERIC and any(fs.type not in ("int", "float") for fs in found):
            kinds = sorted({fs.type for fs in found})
            problems.append(
                f"{f.name}: a {f.kind} needs a numeric field; {f.source}.{f.field} is "
                f"{' / '.join(kinds)}"
            )
    return problems


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
        Feature("avg_spend_1h", "mean", 3600, "purchase", field="amount"),
        Feature("max_spend_1h", "max", 3600, "purchase", field="amount"),
        Feature("distinct_items_1h", "distinct", 3600, "impression", field="item_id"),
        Feature("impressions_this_hour", "count", 3600, "impression", window="tumbling"),
        Feature("clicks_session", "count", 3600, "click", window="session", gap_s=600),
    ),
)

VIEWS: tuple[FeatureView, ...] = (USER_ACTIVITY,)
